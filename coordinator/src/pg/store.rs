//! [`PgStore`]: the lease store on PostgreSQL.
//!
//! The [`LeaseStore`] seam is synchronous (the pool's committer is a
//! thread of its own, and a commit must be durable before the call
//! returns), and the PostgreSQL client is async. So the store owns one
//! thread running a small runtime with one connection, and every call is a
//! job sent to it and answered over a channel: the pool's group commit
//! works unchanged, one PostgreSQL transaction (one WAL flush) per batch.
//!
//! Fencing: every commit runs, in its transaction, a check that the
//! leader row still carries this store's term and has not expired, under a
//! share lock of that row. A standby's takeover updates the row, so it
//! waits for a running commit to finish, and every commit after it fails
//! with [`StoreError::Fenced`]: a deposed leader never writes. A store
//! whose term is 0 (not elected) refuses every commit.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::Client;

use super::{connect, migrate, pg_err};
use crate::store::{HostChange, HostRecord, LeaseRecord, LeaseStore, Loaded, StoreError};

/// Bound on one call (a commit, a load); the connection is dropped and
/// made again after a call that ran out.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

enum Op {
    Migrate,
    Commit {
        put: Vec<LeaseRecord>,
        delete: Vec<String>,
        hosts: Vec<HostChange>,
    },
    Load,
    LoadHosts,
    PutMeta(String, Vec<u8>),
    GetMeta(String),
    InitMeta(String, Vec<u8>),
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::Migrate => "migrate",
            Op::Commit { .. } => "commit",
            Op::Load => "load leases",
            Op::LoadHosts => "load hosts",
            Op::PutMeta(..) => "put meta",
            Op::GetMeta(..) => "get meta",
            Op::InitMeta(..) => "init meta",
        }
    }
}

enum Reply {
    Done,
    Leases(Loaded<LeaseRecord>),
    Hosts(Loaded<HostRecord>),
    Meta(Option<Vec<u8>>),
}

struct Job {
    op: Op,
    /// The term the commit is fenced with.
    term: u64,
    reply: std::sync::mpsc::SyncSender<Result<Reply, StoreError>>,
}

/// Lease records in PostgreSQL (see the module doc).
pub struct PgStore {
    jobs: Option<mpsc::UnboundedSender<Job>>,
    term: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: never printed.
        f.debug_struct("PgStore")
            .field("term", &self.term.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects to `url` and applies the migrations the database lacks.
    /// Blocks the calling thread (start-up only).
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let url = url.to_owned();
        let thread = std::thread::Builder::new()
            .name("berth-pg".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start the PostgreSQL store's runtime");
                        return;
                    }
                };
                rt.block_on(serve(url, rx));
            })
            .map_err(|e| StoreError::Pg {
                op: "start",
                detail: e.to_string(),
            })?;
        let store = Self {
            jobs: Some(tx),
            term: Arc::new(AtomicU64::new(0)),
            thread: Some(thread),
        };
        store.call(Op::Migrate)?;
        Ok(store)
    }

    /// The term this store's commits are fenced with; 0 refuses them all.
    pub fn set_term(&self, term: u64) {
        self.term.store(term, Ordering::SeqCst);
    }

    pub fn term(&self) -> u64 {
        self.term.load(Ordering::SeqCst)
    }

    /// Stores `value` under `key` unless the key holds a value already;
    /// returns the value the key holds afterwards (the first writer's).
    pub fn init_meta(&self, key: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        match self.call(Op::InitMeta(key.to_owned(), value.to_vec()))? {
            Reply::Meta(Some(v)) => Ok(v),
            _ => Err(StoreError::Pg {
                op: "init meta",
                detail: format!("{key} is missing right after it was written"),
            }),
        }
    }

    fn call(&self, op: Op) -> Result<Reply, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let job = Job {
            op,
            term: self.term(),
            reply: tx,
        };
        self.jobs
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(job)
            .map_err(|_| StoreError::Closed)?;
        rx.recv().map_err(|_| StoreError::Closed)?
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl LeaseStore for PgStore {
    fn commit(
        &self,
        put: &[LeaseRecord],
        delete: &[String],
        hosts: &[HostChange],
    ) -> Result<(), StoreError> {
        if put.is_empty() && delete.is_empty() && hosts.is_empty() {
            return Ok(());
        }
        self.call(Op::Commit {
            put: put.to_vec(),
            delete: delete.to_vec(),
            hosts: hosts.to_vec(),
        })
        .map(|_| ())
    }

    fn load(&self) -> Result<Loaded<LeaseRecord>, StoreError> {
        match self.call(Op::Load)? {
            Reply::Leases(v) => Ok(v),
            _ => Ok(Loaded::default()),
        }
    }

    fn load_hosts(&self) -> Result<Loaded<HostRecord>, StoreError> {
        match self.call(Op::LoadHosts)? {
            Reply::Hosts(v) => Ok(v),
            _ => Ok(Loaded::default()),
        }
    }

    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.call(Op::PutMeta(key.to_owned(), value.to_vec()))
            .map(|_| ())
    }

    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self.call(Op::GetMeta(key.to_owned()))? {
            Reply::Meta(v) => Ok(v),
            _ => Ok(None),
        }
    }
}

/// The store's thread: one job at a time on one connection, made again
/// after it broke.
async fn serve(url: String, mut jobs: mpsc::UnboundedReceiver<Job>) {
    let mut client: Option<Client> = None;
    while let Some(job) = jobs.recv().await {
        let op = job.op.name();
        let result = match tokio::time::timeout(
            CALL_TIMEOUT,
            run(&mut client, &url, job.op, job.term),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => {
                // Whatever the connection was doing is abandoned with it.
                client = None;
                Err(StoreError::PgTimeout {
                    op,
                    after: CALL_TIMEOUT,
                })
            }
        };
        let _ = job.reply.send(result);
    }
}

async fn run(
    client: &mut Option<Client>,
    url: &str,
    op: Op,
    term: u64,
) -> Result<Reply, StoreError> {
    if client.as_ref().is_none_or(Client::is_closed) {
        *client = Some(connect(url).await?);
    }
    let Some(c) = client.as_mut() else {
        return Err(StoreError::Closed);
    };
    match op {
        Op::Migrate => migrate::apply(c).await.map(|_| Reply::Done),
        Op::Commit { put, delete, hosts } => commit(c, term, &put, &delete, &hosts)
            .await
            .map(|()| Reply::Done),
        Op::Load => {
            let rows = c
                .query("SELECT id, record::text FROM berth_leases", &[])
                .await
                .map_err(pg_err("load leases"))?;
            Ok(Reply::Leases(decode_rows(&rows)))
        }
        Op::LoadHosts => {
            let rows = c
                .query("SELECT id, record::text FROM berth_hosts", &[])
                .await
                .map_err(pg_err("load hosts"))?;
            Ok(Reply::Hosts(decode_rows(&rows)))
        }
        Op::PutMeta(key, value) => c
            .execute(
                // A coordinator restarted with the files the pool already
                // holds writes nothing.
                "INSERT INTO berth_meta (key, value) VALUES ($1, $2)
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value
                 WHERE berth_meta.value IS DISTINCT FROM EXCLUDED.value",
                &[&key, &value],
            )
            .await
            .map(|_| Reply::Done)
            .map_err(pg_err("put meta")),
        Op::GetMeta(key) => get_meta(c, &key).await.map(Reply::Meta),
        Op::InitMeta(key, value) => {
            c.execute(
                "INSERT INTO berth_meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
                &[&key, &value],
            )
            .await
            .map_err(pg_err("init meta"))?;
            get_meta(c, &key).await.map(Reply::Meta)
        }
    }
}

async fn get_meta(c: &Client, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(
        c.query_opt("SELECT value FROM berth_meta WHERE key = $1", &[&key])
            .await
            .map_err(pg_err("get meta"))?
            .map(|r| r.get(0)),
    )
}

/// Rows of (id, record as text): those whose JSON does not fit the record
/// are listed apart, left in their table.
fn decode_rows<T: serde::de::DeserializeOwned>(rows: &[tokio_postgres::Row]) -> Loaded<T> {
    let mut out = Loaded::default();
    for r in rows {
        let (id, json): (String, String) = (r.get(0), r.get(1));
        out.decode(&id, json.as_bytes());
    }
    out
}

/// Checks, under a share lock of the leader row, that `term` is the
/// current, unexpired leader's.
pub(super) async fn fence(
    tx: &tokio_postgres::Transaction<'_>,
    term: u64,
) -> Result<(), StoreError> {
    let row = tx
        .query_one(
            "SELECT term, expires_at > now() FROM berth_leader WHERE id = 1 FOR SHARE",
            &[],
        )
        .await
        .map_err(pg_err("fence"))?;
    let (current, valid): (i64, bool) = (row.get(0), row.get(1));
    if term == 0 || i64::try_from(term).ok() != Some(current) || !valid {
        return Err(StoreError::Fenced {
            mine: term,
            current: if valid {
                format!("term {current}")
            } else {
                format!("term {current}, expired")
            },
        });
    }
    Ok(())
}

async fn commit(
    c: &mut Client,
    term: u64,
    put: &[LeaseRecord],
    delete: &[String],
    hosts: &[HostChange],
) -> Result<(), StoreError> {
    let tx = c.transaction().await.map_err(pg_err("begin"))?;
    fence(&tx, term).await?;
    if !put.is_empty() {
        let ids: Vec<&str> = put.iter().map(|r| r.id.as_str()).collect();
        // Serialising a struct of strings and numbers cannot fail.
        let docs: Vec<String> = put
            .iter()
            .map(|r| serde_json::to_string(r).unwrap_or_default())
            .collect();
        tx.execute(
            "INSERT INTO berth_leases (id, record)
             SELECT i, r::jsonb FROM unnest($1::text[], $2::text[]) AS t(i, r)
             ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record",
            &[&ids, &docs],
        )
        .await
        .map_err(pg_err("write leases"))?;
    }
    if !delete.is_empty() {
        tx.execute(
            "DELETE FROM berth_leases WHERE id = ANY($1::text[])",
            &[&delete],
        )
        .await
        .map_err(pg_err("delete leases"))?;
    }
    let (mut ids, mut docs, mut gone) = (Vec::new(), Vec::new(), Vec::new());
    for (id, r) in hosts {
        match r {
            Some(r) => {
                ids.push(id.as_str());
                docs.push(serde_json::to_string(r).unwrap_or_default());
            }
            None => gone.push(id.as_str()),
        }
    }
    if !ids.is_empty() {
        tx.execute(
            "INSERT INTO berth_hosts (id, record)
             SELECT i, r::jsonb FROM unnest($1::text[], $2::text[]) AS t(i, r)
             ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record",
            &[&ids, &docs],
        )
        .await
        .map_err(pg_err("write hosts"))?;
    }
    if !gone.is_empty() {
        tx.execute(
            "DELETE FROM berth_hosts WHERE id = ANY($1::text[])",
            &[&gone],
        )
        .await
        .map_err(pg_err("delete hosts"))?;
    }
    tx.commit().await.map_err(pg_err("commit"))
}
