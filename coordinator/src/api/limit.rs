//! The server's limit on CI and operator calls served at once
//! (`--max-requests`): a call beyond it is refused at once with
//! RESOURCE_EXHAUSTED naming the limit, rather than queued behind the
//! others, so an overloaded coordinator answers quickly and its memory and
//! tasks stay bounded. An Acquire counts for as long as it waits for a
//! host, so the limit sits above `--max-queued` by default.
//!
//! Agents' streams are not counted: they live as long as their hosts, and a
//! pool at its limit must still hear its hosts (admission and the join
//! token bound them). Health and reflection are not counted either.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::Error;

/// How many calls beyond `--max-queued` the default `--max-requests`
/// leaves room for (renewals, releases, queue polls, the admin API).
pub const DEFAULT_HEADROOM: usize = 1_000;

/// Calls in flight, up to a maximum.
pub struct RequestLimit {
    permits: Arc<Semaphore>,
    max: usize,
    refusals: Counter,
}

impl RequestLimit {
    /// A limit of `max` calls at once (at least 1); refusals are counted
    /// in `refusals`.
    pub fn new(max: usize, refusals: Counter) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
            refusals,
        }
    }

    /// A place for one call, held until the returned permit is dropped;
    /// refused at once when every place is taken.
    pub fn enter(&self) -> Result<OwnedSemaphorePermit, Error> {
        self.permits.clone().try_acquire_owned().map_err(|_| {
            self.refusals.inc();
            Error::TooManyRequests { max: self.max }
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_call_beyond_the_limit_is_refused_naming_it_and_a_freed_place_serves_again() {
        let refusals = Counter::default();
        let limit = RequestLimit::new(2, refusals.clone());
        let a = limit.enter().unwrap();
        let _b = limit.enter().unwrap();
        let e = limit.enter().unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.to_string().contains("--max-requests"), "{e}");
        assert!(e.to_string().contains('2'), "{e}");
        assert_eq!(refusals.get(), 1);
        drop(a);
        assert!(limit.enter().is_ok());
        assert_eq!(refusals.get(), 1);
    }
}
