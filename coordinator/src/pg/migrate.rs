//! The schema: `coordinator/migrations/NNNN_*.sql`, each applied once, in
//! order. A coordinator applies what is missing at start, in one
//! transaction under an advisory lock, so two that start together do not
//! race and a failed migration leaves nothing half done.

use tokio_postgres::Client;

use super::pg_err;
use crate::store::StoreError;

/// Every migration, oldest first: (version, SQL).
pub const MIGRATIONS: &[(i32, &str)] = &[(1, include_str!("../../migrations/0001_init.sql"))];

/// Key of the advisory lock migrations run under.
const LOCK: i64 = 0x6265_7274_685f_6d67; // "berth_mg"

/// Applies the migrations the database lacks; returns how many it applied.
pub async fn apply(client: &mut Client) -> Result<usize, StoreError> {
    let tx = client.transaction().await.map_err(pg_err("begin"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK])
        .await
        .map_err(pg_err("lock for migrations"))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS berth_migrations (
             version    int PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(pg_err("create berth_migrations"))?;
    let done: Vec<i32> = tx
        .query("SELECT version FROM berth_migrations", &[])
        .await
        .map_err(pg_err("read berth_migrations"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut applied = 0;
    for (version, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        tx.batch_execute(sql).await.map_err(pg_err("migrate"))?;
        tx.execute(
            "INSERT INTO berth_migrations (version) VALUES ($1)",
            &[version],
        )
        .await
        .map_err(pg_err("record migration"))?;
        tracing::info!(version, "applied a schema migration");
        applied += 1;
    }
    tx.commit().await.map_err(pg_err("commit migrations"))?;
    Ok(applied)
}
