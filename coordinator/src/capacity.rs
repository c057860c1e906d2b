//! Elastic capacity: how many hosts the pool should have, decided by the
//! coordinator alone (one party changes capacity). The decision is pure:
//! [`Scaler::decide`] takes what the pool holds now and returns the desired
//! number of hosts and how many idle hosts to retire; the pool applies it
//! (draining the chosen idle hosts), and an actuator follows the desired
//! number (`berth up` starts local hosts; on EC2 the Auto Scaling group).
//!
//! `desired = clamp(leased + queued + idle_target, min, max)`: every build
//! holding or waiting for a host gets one, plus a few ready ones for the
//! next builds. Growing is immediate. Shrinking is the retiring of idle
//! hosts only (a leased host is never taken from its build): when the
//! registered hosts exceed `desired` and more hosts than `idle_target` are
//! idle, continuously for `scale_in_after`, the excess idle hosts go.
//! Single-use hosts that end their lease are simply not replaced while the
//! pool is above `desired`.

use std::time::Duration;

use tokio::time::Instant;

/// The elastic pool's settings (`--min-hosts`, `--max-hosts`,
/// `--idle-hosts`, `--scale-in-after`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapacityConfig {
    pub min: u32,
    pub max: u32,
    /// Ready hosts to keep beyond the builds holding or waiting for one.
    pub idle_target: u32,
    /// How long idle hosts must stay above the target before they go.
    pub scale_in_after: Duration,
}

/// What the pool holds when a decision is made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Inputs {
    /// Hosts holding (or being given) a lease.
    pub leased: u32,
    /// Builds waiting for a host.
    pub queued: u32,
    /// Hosts that could take a lease now.
    pub idle: u32,
    /// Registered hosts that are not draining (idle, leased, or neither:
    /// wiping, unhealthy, silent).
    pub hosts: u32,
}

/// A decision: the hosts to have, and how many idle ones to retire now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Decision {
    pub desired: u32,
    pub retire_idle: u32,
}

/// Hosts the pool should have for `inputs`.
pub fn desired(cfg: &CapacityConfig, inputs: &Inputs) -> u32 {
    inputs
        .leased
        .saturating_add(inputs.queued)
        .saturating_add(cfg.idle_target)
        .clamp(cfg.min, cfg.max.max(cfg.min))
}

/// The scale-in timer between decisions.
#[derive(Debug, Clone)]
pub struct Scaler {
    cfg: CapacityConfig,
    /// Since when idle hosts have been in excess, without a break.
    excess_since: Option<Instant>,
}

impl Scaler {
    pub fn new(cfg: CapacityConfig) -> Self {
        Self {
            cfg,
            excess_since: None,
        }
    }

    pub fn config(&self) -> &CapacityConfig {
        &self.cfg
    }

    /// Decides at `now`. Idle hosts in excess (above both the idle target
    /// and what `desired` leaves room for) are retired once the excess has
    /// lasted `scale_in_after`; then the timer starts over.
    pub fn decide(&mut self, inputs: &Inputs, now: Instant) -> Decision {
        let desired = desired(&self.cfg, inputs);
        let excess = inputs
            .idle
            .saturating_sub(self.cfg.idle_target)
            .min(inputs.hosts.saturating_sub(desired));
        if excess == 0 {
            self.excess_since = None;
            return Decision {
                desired,
                retire_idle: 0,
            };
        }
        let since = *self.excess_since.get_or_insert(now);
        if now.saturating_duration_since(since) < self.cfg.scale_in_after {
            return Decision {
                desired,
                retire_idle: 0,
            };
        }
        self.excess_since = None;
        Decision {
            desired,
            retire_idle: excess,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: CapacityConfig = CapacityConfig {
        min: 1,
        max: 4,
        idle_target: 1,
        scale_in_after: Duration::from_secs(30),
    };

    fn inputs(leased: u32, queued: u32, idle: u32, hosts: u32) -> Inputs {
        Inputs {
            leased,
            queued,
            idle,
            hosts,
        }
    }

    #[test]
    fn desired_follows_the_builds_plus_the_idle_target_within_min_and_max() {
        for (leased, queued, want) in [
            (0, 0, 1),  // idle: the target, at least min
            (1, 0, 2),  // one build: one more ready
            (1, 5, 4),  // a burst: capped at max
            (4, 20, 4), // far beyond: still max
            (2, 1, 4),
            (1, 1, 3),
        ] {
            assert_eq!(
                desired(&CFG, &inputs(leased, queued, 0, 0)),
                want,
                "{leased} leased, {queued} queued"
            );
        }
        let floor = CapacityConfig {
            min: 3,
            idle_target: 0,
            ..CFG
        };
        assert_eq!(desired(&floor, &inputs(0, 0, 0, 0)), 3);
        // min above max: min wins (a misconfiguration is not a panic).
        let odd = CapacityConfig { min: 5, ..CFG };
        assert_eq!(desired(&odd, &inputs(0, 0, 0, 0)), 5);
        assert_eq!(
            desired(&CFG, &inputs(u32::MAX, u32::MAX, 0, 0)),
            4,
            "no overflow"
        );
    }

    #[test]
    fn idle_hosts_in_excess_go_only_after_the_delay_and_only_the_excess() {
        let mut s = Scaler::new(CFG);
        let t0 = Instant::now();
        // The burst is over: 4 idle hosts, nothing leased or queued.
        let idle4 = inputs(0, 0, 4, 4);
        assert_eq!(
            s.decide(&idle4, t0),
            Decision {
                desired: 1,
                retire_idle: 0
            }
        );
        assert_eq!(
            s.decide(&idle4, t0 + Duration::from_secs(29)).retire_idle,
            0
        );
        assert_eq!(
            s.decide(&idle4, t0 + Duration::from_secs(30)).retire_idle,
            3
        );
        // The timer starts over.
        assert_eq!(
            s.decide(&idle4, t0 + Duration::from_secs(31)).retire_idle,
            0
        );
    }

    #[test]
    fn a_break_in_the_excess_restarts_the_delay() {
        let mut s = Scaler::new(CFG);
        let t0 = Instant::now();
        let idle3 = inputs(0, 0, 3, 3);
        s.decide(&idle3, t0);
        // A build took two hosts: no excess for a moment.
        s.decide(&inputs(2, 0, 1, 3), t0 + Duration::from_secs(20));
        assert_eq!(
            s.decide(&idle3, t0 + Duration::from_secs(40)).retire_idle,
            0
        );
        assert_eq!(
            s.decide(&idle3, t0 + Duration::from_secs(70)).retire_idle,
            2
        );
    }

    #[test]
    fn leased_hosts_are_never_retired_and_neither_is_the_idle_target() {
        let mut s = Scaler::new(CFG);
        let t0 = Instant::now();
        let late = t0 + Duration::from_secs(3600);
        // 3 leased, 1 idle: the idle one is the target.
        s.decide(&inputs(3, 0, 1, 4), t0);
        assert_eq!(s.decide(&inputs(3, 0, 1, 4), late).retire_idle, 0);
        // 2 leased, 2 idle, desired 3: one idle host is in excess.
        let mut s = Scaler::new(CFG);
        s.decide(&inputs(2, 0, 2, 4), t0);
        assert_eq!(
            s.decide(&inputs(2, 0, 2, 4), late),
            Decision {
                desired: 3,
                retire_idle: 1
            }
        );
        // Builds waiting: idle hosts are about to be taken, none goes.
        let mut s = Scaler::new(CFG);
        s.decide(&inputs(0, 3, 3, 3), t0);
        assert_eq!(s.decide(&inputs(0, 3, 3, 3), late).retire_idle, 0);
        // At min: nothing goes even with idle above the target.
        let min3 = CapacityConfig { min: 3, ..CFG };
        let mut s = Scaler::new(min3);
        s.decide(&inputs(0, 0, 3, 3), t0);
        assert_eq!(s.decide(&inputs(0, 0, 3, 3), late).retire_idle, 0);
    }
}
