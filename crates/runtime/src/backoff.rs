//! Jittered exponential backoff, the one rule every retry in berth follows:
//! the n-th delay is drawn uniformly from [c/2, c], where the ceiling c
//! starts at `base` and doubles per attempt up to `max`. The jitter keeps a
//! fleet of agents (or CI jobs) from retrying in lockstep; the lower bound
//! keeps a retry from coming back at once.

use std::time::Duration;

use rand::Rng;

/// A delay drawn from [ceiling/2, ceiling].
pub fn jittered(ceiling: Duration, rng: &mut impl Rng) -> Duration {
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.random_range(nanos / 2..=nanos))
}

/// The ceiling before attempt `n + 1` (n >= 1): `base * 2^(n-1)`, capped at `max`.
pub fn ceiling(base: Duration, max: Duration, n: u32) -> Duration {
    let doublings = n.saturating_sub(1).min(20);
    base.saturating_mul(1 << doublings).min(max)
}

/// A backoff that remembers where it is: [`Backoff::next_delay`] doubles
/// the ceiling each time, [`Backoff::reset`] starts small again.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            current: base,
        }
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.current;
        self.current = (self.current * 2).min(self.max);
        jittered(ceiling, rng)
    }

    /// After a success, start small again.
    pub fn reset(&mut self) {
        self.current = self.base;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn delays_double_to_the_cap_with_jitter_and_reset() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        let mut b = Backoff::new(base, max);
        let mut c = base;
        for _ in 0..12 {
            let d = b.next_delay(&mut rng);
            assert!(d >= c / 2 && d <= c, "{d:?} not in [{:?}, {c:?}]", c / 2);
            c = (c * 2).min(max);
        }
        b.reset();
        assert!(b.next_delay(&mut rng) <= base);
    }

    #[test]
    fn ceilings_double_per_attempt_and_stop_at_the_cap() {
        let base = Duration::from_millis(50);
        let max = Duration::from_secs(1);
        assert_eq!(ceiling(base, max, 1), base);
        assert_eq!(ceiling(base, max, 2), base * 2);
        assert_eq!(ceiling(base, max, 5), Duration::from_millis(800));
        assert_eq!(ceiling(base, max, 6), max);
        assert_eq!(ceiling(base, max, u32::MAX), max);
    }
}
