//! The shared store and leadership: several coordinators on one PostgreSQL
//! database, one of which leads while the others stand by.
//!
//! - [`PgStore`] is the [`crate::store::LeaseStore`] on PostgreSQL: the same
//!   records as the embedded store, written by the pool's one committer
//!   thread, each commit fenced by the leader's term.
//! - [`leader`] is who leads: one row with a term and an expiry on the
//!   database's clock; a standby takes it over once it expired.
//! - [`seal`] and [`boot`]: the pool CA (its key sealed with a key from a
//!   file), the tenants and the join token hash live in the database too,
//!   so every coordinator serves with the same ones.
//! - [`standby`] is what a standby answers: health, and UNAVAILABLE with
//!   the leader's address for everything else; [`run`] ties it together.
//!
//! The schema is in `coordinator/migrations/`, applied by [`migrate`].

pub mod boot;
pub mod leader;
pub mod migrate;
pub mod run;
pub mod seal;
pub mod standby;
mod store;
#[cfg(test)]
mod tests;

pub use store::PgStore;

use crate::store::StoreError;

/// A PostgreSQL error as a store error, with the server's message (the
/// client's own text is only "db error").
pub(crate) fn pg_err(op: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
    move |e| {
        let detail = match e.as_db_error() {
            Some(db) => format!("{}: {}", db.code().code(), db.message()),
            None => berth_runtime::error_chain(&e),
        };
        StoreError::Pg { op, detail }
    }
}

/// Connects to `url`; the connection is driven by a task on the current
/// runtime.
pub(crate) async fn connect(url: &str) -> Result<tokio_postgres::Client, StoreError> {
    let (client, conn) = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_postgres::connect(url, tokio_postgres::NoTls),
    )
    .await
    .map_err(|_| StoreError::PgTimeout {
        op: "connect",
        after: CONNECT_TIMEOUT,
    })?
    .map_err(pg_err("connect"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %berth_runtime::error_chain(&e), "PostgreSQL connection closed");
        }
    });
    Ok(client)
}

/// Bound on connecting to PostgreSQL.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
