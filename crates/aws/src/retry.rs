//! The one way berth calls AWS: each attempt bounded by a timeout, failed
//! attempts retried after a jittered, doubling delay, and the number of
//! attempts bounded, so every call has a worst-case duration that the
//! caller can add up ([`RetryPolicy::budget`]).

use std::future::Future;
use std::time::Duration;

use berth_runtime::backoff;
use rand::Rng;

/// How many times, and how patiently, to try one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all (at least 1).
    pub attempts: u32,
    /// Bound on one attempt.
    pub attempt_timeout: Duration,
    /// Delay ceiling before the second attempt; doubles per attempt.
    pub base_delay: Duration,
    /// Largest delay ceiling.
    pub max_delay: Duration,
}

impl RetryPolicy {
    /// The longest the whole call can take.
    pub fn budget(&self) -> Duration {
        let attempts = self.attempts.max(1);
        let mut total = self.attempt_timeout * attempts;
        let mut ceiling = self.base_delay;
        for _ in 1..attempts {
            total += ceiling;
            ceiling = (ceiling * 2).min(self.max_delay);
        }
        total
    }

    /// The delay before attempt `n + 1` (n >= 1): uniform in [c/2, c] with
    /// c = base * 2^(n-1), capped at `max_delay`. Jitter keeps a fleet of
    /// agents from retrying in lockstep.
    pub fn delay(&self, n: u32, rng: &mut impl Rng) -> Duration {
        backoff::jittered(backoff::ceiling(self.base_delay, self.max_delay, n), rng)
    }
}

/// What one attempt's failure means.
#[derive(Debug)]
pub enum Outcome<E> {
    /// Worth another attempt (throttling, a 5xx, a connection failure).
    Retry(E),
    /// Final: retrying would get the same answer.
    Fail(E),
}

/// Why a call failed after retrying.
#[derive(Debug, thiserror::Error)]
pub enum RetryError<E: std::fmt::Display> {
    #[error("{error} (attempt {attempts})")]
    Failed { error: E, attempts: u32 },
    #[error("no answer within {attempt_timeout:?} on any of {attempts} attempts")]
    TimedOut {
        attempts: u32,
        attempt_timeout: Duration,
    },
}

impl<E: std::fmt::Display> RetryError<E> {
    /// The last error the service gave, if it gave one.
    pub fn error(&self) -> Option<&E> {
        match self {
            RetryError::Failed { error, .. } => Some(error),
            RetryError::TimedOut { .. } => None,
        }
    }
}

/// Runs `op` under `policy`. `what` names the call in the retry log lines.
pub async fn with_retries<T, E, F, Fut>(
    what: &str,
    policy: &RetryPolicy,
    mut op: F,
) -> Result<T, RetryError<E>>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Outcome<E>>>,
{
    let attempts = policy.attempts.max(1);
    let mut last: Option<E> = None;
    for n in 1..=attempts {
        match tokio::time::timeout(policy.attempt_timeout, op()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(Outcome::Fail(error))) => return Err(RetryError::Failed { error, attempts: n }),
            Ok(Err(Outcome::Retry(error))) => {
                tracing::debug!(call = what, attempt = n, %error, "AWS call failed; will retry");
                last = Some(error);
            }
            Err(_) => {
                tracing::debug!(call = what, attempt = n, timeout = ?policy.attempt_timeout, "AWS call timed out");
                last = None;
            }
        }
        if n < attempts {
            let delay = policy.delay(n, &mut rand::rng());
            tokio::time::sleep(delay).await;
        }
    }
    Err(match last {
        Some(error) => RetryError::Failed { error, attempts },
        None => RetryError::TimedOut {
            attempts,
            attempt_timeout: policy.attempt_timeout,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use std::sync::atomic::{AtomicU32, Ordering};

    const POLICY: RetryPolicy = RetryPolicy {
        attempts: 4,
        attempt_timeout: Duration::from_secs(2),
        base_delay: Duration::from_millis(100),
        max_delay: Duration::from_millis(300),
    };

    #[test]
    fn budget_adds_up_attempts_and_capped_delays() {
        // 4 x 2 s + 100 + 200 + 300 ms.
        assert_eq!(POLICY.budget(), Duration::from_millis(8600));
    }

    #[test]
    fn delays_are_jittered_within_doubling_capped_ceilings() {
        let mut rng = StdRng::seed_from_u64(1);
        for (n, ceiling) in [(1, 100), (2, 200), (3, 300), (9, 300)] {
            for _ in 0..50 {
                let d = POLICY.delay(n, &mut rng);
                let c = Duration::from_millis(ceiling);
                assert!(
                    d >= c / 2 && d <= c,
                    "attempt {n}: {d:?} not in [{:?}, {c:?}]",
                    c / 2
                );
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retryable_errors_are_retried_until_success() {
        let calls = AtomicU32::new(0);
        let r: Result<u32, RetryError<String>> = with_retries("t", &POLICY, || async {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            if n < 3 {
                Err(Outcome::Retry(format!("busy {n}")))
            } else {
                Ok(n)
            }
        })
        .await;
        assert_eq!(r.unwrap(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn final_errors_stop_at_once_and_retries_are_bounded() {
        let calls = AtomicU32::new(0);
        let r: Result<(), RetryError<String>> = with_retries("t", &POLICY, || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(Outcome::Fail("not found".to_owned()))
        })
        .await;
        assert!(matches!(r, Err(RetryError::Failed { attempts: 1, .. })));
        assert_eq!(calls.swap(0, Ordering::SeqCst), 1);

        let r: Result<(), RetryError<String>> = with_retries("t", &POLICY, || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(Outcome::Retry("throttled".to_owned()))
        })
        .await;
        let err = r.unwrap_err();
        assert_eq!(err.to_string(), "throttled (attempt 4)");
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn hung_attempts_time_out_within_the_budget() {
        let start = tokio::time::Instant::now();
        let r: Result<(), RetryError<String>> =
            with_retries("t", &POLICY, std::future::pending).await;
        assert!(matches!(r, Err(RetryError::TimedOut { attempts: 4, .. })));
        assert!(start.elapsed() <= POLICY.budget());
        assert!(start.elapsed() >= POLICY.attempt_timeout * 4);
    }
}
