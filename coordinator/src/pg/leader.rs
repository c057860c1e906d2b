//! Who leads: the one row of `berth_leader` (term, holder, address,
//! expiry on the database's clock).
//!
//! A coordinator takes the row over only once it expired, raising the
//! term; while it leads it renews the expiry well before it passes, and
//! every write it makes is fenced by its term (`PgStore`). A leader that
//! cannot renew in time stops leading on its own before the row expires
//! (the expiry is counted from when the renewal was sent, so its own view
//! runs out first), and a standby takes over only after expiry: two
//! coordinators never both act as leader, and a deposed one's writes fail
//! even if it does not know yet.

use std::time::Duration;

use tokio_postgres::Client;

use super::{connect, pg_err};
use crate::store::StoreError;

/// Bound on one election call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// The current leader, as the row says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    pub term: u64,
    pub holder: String,
    pub addr: String,
}

/// One coordinator's side of the election, on a connection of its own
/// (renewals never queue behind the store's commits).
pub struct Election {
    url: String,
    client: Option<Client>,
    /// Unique per process: a restarted coordinator is a new candidate.
    holder: String,
    addr: String,
    ttl: Duration,
}

impl std::fmt::Debug for Election {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Election")
            .field("holder", &self.holder)
            .field("addr", &self.addr)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn term_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Election {
    /// A candidate that names `addr` as its address while it leads.
    pub fn new(url: &str, addr: String, ttl: Duration) -> Self {
        Self {
            url: url.to_owned(),
            client: None,
            holder: uuid::Uuid::new_v4().to_string(),
            addr,
            ttl,
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    async fn client(&mut self) -> Result<&Client, StoreError> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = Some(connect(&self.url).await?);
        }
        self.client.as_ref().ok_or(StoreError::Closed)
    }

    async fn bounded<T>(
        &mut self,
        op: &'static str,
        f: impl AsyncFnOnce(&Client) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let r = tokio::time::timeout(CALL_TIMEOUT, async {
            let c = self.client().await?;
            f(c).await
        })
        .await;
        match r {
            Ok(r) => r,
            Err(_) => {
                self.client = None;
                Err(StoreError::PgTimeout {
                    op,
                    after: CALL_TIMEOUT,
                })
            }
        }
    }

    /// Takes the lead if the row expired; returns the new term.
    pub async fn try_lead(&mut self) -> Result<Option<u64>, StoreError> {
        let (holder, addr, ttl) = (self.holder.clone(), self.addr.clone(), secs(self.ttl));
        self.bounded("take the lead", async move |c| {
            let row = c
                .query_opt(
                    "UPDATE berth_leader
                     SET term = term + 1, holder = $1, addr = $2,
                         expires_at = now() + make_interval(secs => $3)
                     WHERE id = 1 AND expires_at <= now()
                     RETURNING term",
                    &[&holder, &addr, &ttl],
                )
                .await
                .map_err(pg_err("take the lead"))?;
            Ok(row.map(|r| term_of(r.get(0))))
        })
        .await
    }

    /// Extends the lead of `term`; `false` if it is no longer this
    /// candidate's (taken over, or expired).
    pub async fn renew(&mut self, term: u64) -> Result<bool, StoreError> {
        let (holder, ttl) = (self.holder.clone(), secs(self.ttl));
        let t = i64::try_from(term).unwrap_or(-1);
        self.bounded("renew the lead", async move |c| {
            let n = c
                .execute(
                    "UPDATE berth_leader
                     SET expires_at = now() + make_interval(secs => $3)
                     WHERE id = 1 AND term = $1 AND holder = $2 AND expires_at > now()",
                    &[&t, &holder, &ttl],
                )
                .await
                .map_err(pg_err("renew the lead"))?;
            Ok(n == 1)
        })
        .await
    }

    /// Gives the lead of `term` up at once (a clean stop), so a standby
    /// need not wait for it to expire.
    pub async fn resign(&mut self, term: u64) -> Result<(), StoreError> {
        let holder = self.holder.clone();
        let t = i64::try_from(term).unwrap_or(-1);
        self.bounded("resign", async move |c| {
            c.execute(
                "UPDATE berth_leader SET expires_at = now()
                 WHERE id = 1 AND term = $1 AND holder = $2",
                &[&t, &holder],
            )
            .await
            .map_err(pg_err("resign"))?;
            Ok(())
        })
        .await
    }

    /// The current, unexpired leader, if any.
    pub async fn leader(&mut self) -> Result<Option<Leader>, StoreError> {
        self.bounded("read the leader", async move |c| {
            let row = c
                .query_opt(
                    "SELECT term, holder, addr FROM berth_leader
                     WHERE id = 1 AND expires_at > now()",
                    &[],
                )
                .await
                .map_err(pg_err("read the leader"))?;
            Ok(row.map(|r| Leader {
                term: term_of(r.get(0)),
                holder: r.get(1),
                addr: r.get(2),
            }))
        })
        .await
    }
}
