//! What the coordinator keeps on disk so that a restart (even `kill -9`)
//! loses no lease: one record per lease (id, build id, tenant, state, host,
//! deadline, creation time, message, wipe report, pinned key), written
//! through on every change; one record per host the pool must remember
//! beyond its connection (the key its id is bound to, and when a lease it
//! held ended: a burned host is never offered again); and a small key/value
//! table for other state that must outlive the process (e.g. a CA). Idempotency keys (build id -> live lease) are not
//! stored separately: they are rebuilt from the live lease records at start.
//!
//! [`LeaseStore`] is the seam; [`crate::pg::PgStore`] keeps the same
//! records in PostgreSQL for coordinators that share them; [`RedbStore`] is the embedded store (redb: pure
//! Rust, one file, crash-safe commits; it builds in seconds with no C
//! toolchain, where rusqlite's `bundled` feature compiles all of SQLite), and
//! [`MemStore`] keeps records in memory for unit tests and for pools that are
//! not meant to survive their process.
//!
//! Every commit is durable (fsync) before the call returns, so a record the
//! pool wrote is on disk before the gRPC answer that depends on it leaves.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use berth_proto::v1 as pb;
use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// Lease records by lease id; the value is the record as JSON.
const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");
/// Host records by host id; the value is the record as JSON.
const HOSTS: TableDefinition<&str, &[u8]> = TableDefinition::new("hosts");
/// Anything else that must outlive the process, by key.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// File name of the store inside the coordinator's state directory.
pub const STORE_FILE: &str = "coordinator.redb";

/// What the store failed at.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening the store {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("store {op}: {source}")]
    Db {
        op: &'static str,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("lease record {id:?} is unreadable: {source}")]
    Decode {
        id: String,
        #[source]
        source: serde_json::Error,
    },
    /// A PostgreSQL call failed; `detail` is the error with its causes.
    #[error("PostgreSQL {op}: {detail}")]
    Pg { op: &'static str, detail: String },
    #[error("PostgreSQL {op} did not finish within {after:?}")]
    PgTimeout {
        op: &'static str,
        after: std::time::Duration,
    },
    /// A write of a coordinator that does not (or no longer) lead: its
    /// term is not the current, unexpired one.
    #[error("write refused: this coordinator's term {mine} is not the leader's ({current})")]
    Fenced { mine: u64, current: String },
    #[error("the store is closed")]
    Closed,
}

fn db_err(op: &'static str) -> impl FnOnce(redb::Error) -> StoreError {
    move |e| StoreError::Db {
        op,
        source: Box::new(e),
    }
}

/// One lease as it is kept on disk. Times are wall-clock nanoseconds since
/// the Unix epoch: the monotonic clock means nothing to the next process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub id: String,
    pub build_id: String,
    /// The tenant that acquired the lease; only it may see or end it.
    #[serde(default)]
    pub tenant: String,
    /// `LeaseState::name()` of the lease.
    pub state: String,
    /// Empty while queued.
    pub host_id: String,
    pub host_addr: String,
    pub docker_host: String,
    pub ttl_ns: u64,
    /// When the lease ends unless renewed; `None` until a host is chosen.
    pub deadline_ns: Option<u64>,
    pub created_ns: u64,
    pub message: String,
    /// The agent's wipe report, protobuf-encoded.
    #[serde(default)]
    pub wipe: Option<Vec<u8>>,
    /// The lease's timeline (`crate::timeline`), oldest first; absent in
    /// records written before timelines existed.
    #[serde(default)]
    pub timeline: Vec<TimelineRecord>,
    /// The key the lease is pinned to (hex `KeyId`); empty if none.
    #[serde(default)]
    pub key: String,
    /// The lease's certificate was used: its key no longer moves.
    #[serde(default)]
    pub key_locked: bool,
}

/// What the pool remembers of a host beyond its connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub id: String,
    /// The key the host id is bound to (hex `KeyId`), empty if none.
    #[serde(default)]
    pub key: String,
    /// When a lease the host held ended (wall-clock ns): the host is burned.
    #[serde(default)]
    pub burned_ns: Option<u64>,
}

/// A host record to write, or `None` to delete the host's record.
pub type HostChange = (String, Option<HostRecord>);

/// What a load found: the records that decode, and the keys of those that
/// do not. An unreadable record is left where it is (a newer coordinator,
/// or a person, may still read it) and never restored: the pool
/// quarantines it (`pool::persist::quarantine`) rather than refuse to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded<T> {
    pub records: Vec<T>,
    pub unreadable: Vec<Unreadable>,
}

impl<T> Default for Loaded<T> {
    fn default() -> Self {
        Self {
            records: Vec::new(),
            unreadable: Vec::new(),
        }
    }
}

impl<T: serde::de::DeserializeOwned> Loaded<T> {
    /// Adds the record stored under `id`, or notes it as unreadable.
    pub fn decode(&mut self, id: &str, bytes: &[u8]) {
        match serde_json::from_slice(bytes) {
            Ok(r) => self.records.push(r),
            Err(e) => self.unreadable.push(Unreadable {
                id: id.to_owned(),
                error: e.to_string(),
            }),
        }
    }
}

/// A stored record that does not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    /// Its key: the lease id or host id it is stored under.
    pub id: String,
    /// Why it does not decode.
    pub error: String,
}

/// One timeline step as kept on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineRecord {
    /// `timeline::Step::name()`.
    pub step: String,
    pub at_ns: u64,
    #[serde(default)]
    pub detail: String,
}

impl LeaseRecord {
    /// The wipe report, if one was stored and it still decodes.
    pub fn wipe_report(&self) -> Option<pb::WipeReport> {
        use prost::Message;
        self.wipe
            .as_deref()
            .and_then(|b| pb::WipeReport::decode(b).ok())
    }

    /// Encodes a wipe report for [`LeaseRecord::wipe`].
    pub fn encode_wipe(w: &pb::WipeReport) -> Vec<u8> {
        use prost::Message;
        w.encode_to_vec()
    }
}

/// Where lease records live.
pub trait LeaseStore: Send + Sync + 'static {
    /// Writes (inserts or replaces) these lease records, removes those
    /// lease ids, and applies the host changes, in one durable commit.
    fn commit(
        &self,
        put: &[LeaseRecord],
        delete: &[String],
        hosts: &[HostChange],
    ) -> Result<(), StoreError>;
    /// Every stored lease record; those that do not decode are listed
    /// apart (an error only when the store cannot be read at all).
    fn load(&self) -> Result<Loaded<LeaseRecord>, StoreError>;
    /// Every stored host record; those that do not decode listed apart.
    fn load_hosts(&self) -> Result<Loaded<HostRecord>, StoreError>;
    /// Stores a value that must outlive the process.
    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Reads a value stored with [`LeaseStore::put_meta`].
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
}

/// Records in memory: for unit tests and throwaway pools.
#[derive(Debug, Default)]
pub struct MemStore {
    leases: Mutex<BTreeMap<String, LeaseRecord>>,
    hosts: Mutex<BTreeMap<String, HostRecord>>,
    meta: Mutex<BTreeMap<String, Vec<u8>>>,
}

impl LeaseStore for MemStore {
    fn commit(
        &self,
        put: &[LeaseRecord],
        delete: &[String],
        hosts: &[HostChange],
    ) -> Result<(), StoreError> {
        let mut g = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        for r in put {
            g.insert(r.id.clone(), r.clone());
        }
        for id in delete {
            g.remove(id);
        }
        let mut h = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        for (id, r) in hosts {
            match r {
                Some(r) => h.insert(id.clone(), r.clone()),
                None => h.remove(id),
            };
        }
        Ok(())
    }

    fn load(&self) -> Result<Loaded<LeaseRecord>, StoreError> {
        let g = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        Ok(Loaded {
            records: g.values().cloned().collect(),
            unreadable: Vec::new(),
        })
    }

    fn load_hosts(&self) -> Result<Loaded<HostRecord>, StoreError> {
        let g = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        Ok(Loaded {
            records: g.values().cloned().collect(),
            unreadable: Vec::new(),
        })
    }

    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let mut g = self.meta.lock().unwrap_or_else(|e| e.into_inner());
        g.insert(key.to_owned(), value.to_vec());
        Ok(())
    }

    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let g = self.meta.lock().unwrap_or_else(|e| e.into_inner());
        Ok(g.get(key).cloned())
    }
}

/// The embedded, on-disk store.
///
/// After an I/O error (a full disk) redb refuses every later transaction
/// of the same `Database` (`PreviousIo`), so the store closes it and opens
/// the file again at the next call: the pool's retried commit then goes
/// through by itself once there is space again (redb repairs the file on
/// opening if it must).
pub struct RedbStore {
    path: PathBuf,
    db: Mutex<Option<redb::Database>>,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl RedbStore {
    /// Opens (or creates) the store in `state_dir`. After an unclean stop
    /// redb repairs the file here, before the coordinator serves anything.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let path = state_dir.join(STORE_FILE);
        let db = open_db(&path)?;
        Ok(Self {
            path,
            db: Mutex::new(Some(db)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the database, opening it again first if an I/O error
    /// closed it; an I/O error of `f` closes it.
    fn with_db<T>(
        &self,
        f: impl FnOnce(&redb::Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut g = self.db.lock().unwrap_or_else(|e| e.into_inner());
        let db = match g.take() {
            Some(db) => db,
            None => {
                let db = open_db(&self.path)?;
                tracing::info!(path = %self.path.display(), "lease store opened again after an I/O error");
                db
            }
        };
        let r = f(&db);
        let broken = matches!(&r, Err(StoreError::Db { source, .. })
            if matches!(**source, redb::Error::Io(_) | redb::Error::PreviousIo));
        if !broken {
            *g = Some(db);
        }
        r
    }
}

/// Opens (or creates) the redb file and every table.
fn open_db(path: &Path) -> Result<redb::Database, StoreError> {
    let open_err = |e: redb::Error| StoreError::Open {
        path: path.to_owned(),
        source: Box::new(e),
    };
    let db = redb::Database::create(path).map_err(|e| open_err(e.into()))?;
    // Create every table up front so reads never meet a missing table.
    let txn = db.begin_write().map_err(|e| open_err(e.into()))?;
    {
        txn.open_table(LEASES).map_err(|e| open_err(e.into()))?;
        txn.open_table(HOSTS).map_err(|e| open_err(e.into()))?;
        txn.open_table(META).map_err(|e| open_err(e.into()))?;
    }
    txn.commit().map_err(|e| open_err(e.into()))?;
    Ok(db)
}

impl RedbStore {
    /// Every record of `table`, the undecodable ones set aside; `ops`
    /// names the open, iterate and read steps in errors.
    fn load_table<R: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        [open, iterate, read]: [&'static str; 3],
    ) -> Result<Loaded<R>, StoreError> {
        self.with_db(|db| {
            let txn = db
                .begin_read()
                .map_err(|e| db_err("begin read")(e.into()))?;
            let t = txn.open_table(table).map_err(|e| db_err(open)(e.into()))?;
            let mut out = Loaded::default();
            for item in t.iter().map_err(|e| db_err(iterate)(e.into()))? {
                let (k, v) = item.map_err(|e| db_err(read)(e.into()))?;
                out.decode(k.value(), v.value());
            }
            Ok(out)
        })
    }
}

impl LeaseStore for RedbStore {
    fn commit(
        &self,
        put: &[LeaseRecord],
        delete: &[String],
        hosts: &[HostChange],
    ) -> Result<(), StoreError> {
        if put.is_empty() && delete.is_empty() && hosts.is_empty() {
            return Ok(());
        }
        self.with_db(|db| {
            let txn = db
                .begin_write()
                .map_err(|e| db_err("begin write")(e.into()))?;
            {
                let mut t = txn
                    .open_table(LEASES)
                    .map_err(|e| db_err("open leases")(e.into()))?;
                for r in put {
                    // Serialising a struct of strings and numbers cannot fail.
                    let bytes = serde_json::to_vec(r).unwrap_or_default();
                    t.insert(r.id.as_str(), bytes.as_slice())
                        .map_err(|e| db_err("insert lease")(e.into()))?;
                }
                for id in delete {
                    t.remove(id.as_str())
                        .map_err(|e| db_err("remove lease")(e.into()))?;
                }
                let mut h = txn
                    .open_table(HOSTS)
                    .map_err(|e| db_err("open hosts")(e.into()))?;
                for (id, r) in hosts {
                    match r {
                        Some(r) => {
                            let bytes = serde_json::to_vec(r).unwrap_or_default();
                            h.insert(id.as_str(), bytes.as_slice())
                                .map_err(|e| db_err("insert host")(e.into()))?;
                        }
                        None => {
                            h.remove(id.as_str())
                                .map_err(|e| db_err("remove host")(e.into()))?;
                        }
                    }
                }
            }
            txn.commit().map_err(|e| db_err("commit")(e.into()))
        })
    }

    fn load_hosts(&self) -> Result<Loaded<HostRecord>, StoreError> {
        self.load_table(HOSTS, ["open hosts", "iterate hosts", "read host"])
    }

    fn load(&self) -> Result<Loaded<LeaseRecord>, StoreError> {
        self.load_table(LEASES, ["open leases", "iterate leases", "read lease"])
    }

    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.with_db(|db| {
            let txn = db
                .begin_write()
                .map_err(|e| db_err("begin write")(e.into()))?;
            {
                let mut t = txn
                    .open_table(META)
                    .map_err(|e| db_err("open meta")(e.into()))?;
                t.insert(key, value)
                    .map_err(|e| db_err("insert meta")(e.into()))?;
            }
            txn.commit().map_err(|e| db_err("commit")(e.into()))
        })
    }

    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.with_db(|db| {
            let txn = db
                .begin_read()
                .map_err(|e| db_err("begin read")(e.into()))?;
            let t = txn
                .open_table(META)
                .map_err(|e| db_err("open meta")(e.into()))?;
            let v = t.get(key).map_err(|e| db_err("read meta")(e.into()))?;
            Ok(v.map(|v| v.value().to_vec()))
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn rec(id: &str, state: &str) -> LeaseRecord {
        LeaseRecord {
            id: id.into(),
            build_id: format!("b-{id}"),
            tenant: String::new(),
            state: state.into(),
            host_id: "h1".into(),
            host_addr: "198.18.0.2".into(),
            docker_host: "tcp://198.18.0.2:2376".into(),
            ttl_ns: 60_000,
            deadline_ns: Some(1_900_000_000_000),
            created_ns: 1_800_000_000_000,
            message: String::new(),
            wipe: Some(LeaseRecord::encode_wipe(&pb::WipeReport {
                lease_id: id.into(),
                verified: true,
                ..Default::default()
            })),
            timeline: vec![
                TimelineRecord {
                    step: "requested".into(),
                    at_ns: 1_800_000_000_000,
                    detail: format!("build b-{id}"),
                },
                TimelineRecord {
                    step: "wiped".into(),
                    at_ns: 1_800_000_500_000,
                    detail: "verified in 12 ms".into(),
                },
            ],
            key: "cd".repeat(32),
            key_locked: true,
        }
    }

    pub(crate) fn host(id: &str) -> HostChange {
        (
            id.into(),
            Some(HostRecord {
                id: id.into(),
                key: "ab".repeat(32),
                burned_ns: Some(1_800_000_000_000),
            }),
        )
    }

    /// What every durable store must do: commits apply puts, deletes and
    /// host changes together, and all of it is there after reopening.
    /// `open` opens the same store again each time it is called.
    pub(crate) fn records_survive_reopening(open: &dyn Fn() -> Box<dyn LeaseStore>) {
        {
            let s = open();
            s.commit(
                &[rec("a", "active"), rec("b", "queued")],
                &[],
                &[host("h1"), host("h2")],
            )
            .unwrap();
            s.commit(
                &[rec("b", "released")],
                &["a".into()],
                &[("h1".into(), None)],
            )
            .unwrap();
            s.put_meta("ca", b"pem").unwrap();
            s.put_meta("ca", b"pem2").unwrap();
        }
        let s = open();
        let all = s.load().unwrap().records;
        assert_eq!(all, vec![rec("b", "released")]);
        assert_eq!(s.load_hosts().unwrap().records, vec![host("h2").1.unwrap()]);
        assert!(all[0].wipe_report().unwrap().verified);
        assert_eq!(s.get_meta("ca").unwrap().as_deref(), Some(&b"pem2"[..]));
        assert_eq!(s.get_meta("nope").unwrap(), None);
        // An empty commit is a no-op, not an error.
        s.commit(&[], &[], &[]).unwrap();
    }

    /// What every store does with records it cannot decode: `corrupt`
    /// stores an undecodable lease record under `bad-lease` and an
    /// undecodable host record under `h-bad`. They are listed apart, the
    /// pool starts, serves the readable lease, treats the unreadable host
    /// as burned, and leaves both records where they were.
    pub(crate) fn unreadable_records_are_quarantined(
        store: std::sync::Arc<dyn LeaseStore>,
        corrupt: &dyn Fn(),
    ) {
        store
            .commit(&[rec("a", "active")], &[], &[host("h2")])
            .unwrap();
        corrupt();
        let leases = store.load().unwrap();
        assert_eq!(leases.records, vec![rec("a", "active")]);
        assert_eq!(
            leases
                .unreadable
                .iter()
                .map(|u| u.id.as_str())
                .collect::<Vec<_>>(),
            ["bad-lease"]
        );
        let hosts = store.load_hosts().unwrap();
        assert_eq!(hosts.records, vec![host("h2").1.unwrap()]);
        assert_eq!(hosts.unreadable.len(), 1);
        assert_eq!(hosts.unreadable[0].id, "h-bad");

        let now = crate::clock::Now::system();
        let pool =
            crate::pool::Pool::with_store(crate::pool::PoolConfig::default(), store.clone(), now)
                .expect("the coordinator starts despite unreadable records");
        assert_eq!(pool.quarantined(), 2);
        assert_eq!(
            pool.get("", "a").unwrap().state,
            pb::LeaseState::Active as i32
        );
        let (tx, _rx) = tokio::sync::mpsc::channel(4);
        let reg = |id: &str| crate::testing::reg(id, "198.18.0.9");
        let refused = pool
            .register(reg("h-bad"), Default::default(), tx.clone(), now)
            .unwrap_err();
        assert!(refused.to_string().contains("h-bad"), "{refused}");
        // A host with a readable record or none registers as usual.
        pool.register(reg("h3"), Default::default(), tx, now)
            .unwrap();
        drop(pool);
        // Left in place, still unreadable, for a person to look at.
        assert_eq!(store.load().unwrap().unreadable.len(), 1);
        assert_eq!(store.load_hosts().unwrap().unreadable.len(), 1);
    }

    #[test]
    fn unreadable_records_in_the_file_are_quarantined() {
        let dir = std::env::temp_dir().join(format!("berth-store-bad-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = std::sync::Arc::new(RedbStore::open(&dir).unwrap());
        let db = store.clone();
        unreadable_records_are_quarantined(store, &|| {
            db.with_db(|db| {
                let txn = db.begin_write().unwrap();
                {
                    let mut t = txn.open_table(LEASES).unwrap();
                    t.insert("bad-lease", &[0xff, 0x00, 0x13, 0x37][..])
                        .unwrap();
                    let mut h = txn.open_table(HOSTS).unwrap();
                    h.insert("h-bad", &b"{\"id\": 7}"[..]).unwrap();
                }
                txn.commit().unwrap();
                Ok(())
            })
            .unwrap();
        });
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn records_survive_reopening_the_file() {
        let dir = std::env::temp_dir().join(format!("berth-store-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        records_survive_reopening(&|| Box::new(RedbStore::open(&dir).unwrap()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mem_store_behaves_the_same() {
        let s = MemStore::default();
        s.commit(
            &[rec("a", "active"), rec("b", "queued")],
            &[],
            &[host("h1"), host("h2")],
        )
        .unwrap();
        s.commit(
            &[rec("b", "released")],
            &["a".into()],
            &[("h1".into(), None)],
        )
        .unwrap();
        assert_eq!(s.load().unwrap().records, vec![rec("b", "released")]);
        assert_eq!(s.load_hosts().unwrap().records, vec![host("h2").1.unwrap()]);
    }
}
