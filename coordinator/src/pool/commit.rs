//! Group commit: the pool's lease changes reach the store from one committer
//! thread, many changes per durable commit.
//!
//! Under the pool's lock a change only becomes a record in the pending batch
//! (a clone, no I/O) and the batch's sequence number goes up. The committer
//! takes the whole batch, writes it in one store transaction (one fsync) and
//! then publishes the batch's number as durable. A call that must not answer
//! before its change is on disk waits for the number that was current when
//! it let go of the lock (`Pool::durable`). Every fsync therefore covers all
//! the changes that arrived while the previous one ran, and no fsync runs
//! while the pool's lock is held.
//!
//! A failed commit keeps its records (merged under anything newer for the
//! same lease) and is retried, with a growing pause, until one succeeds.
//! Meanwhile the store counts as failing ([`Health`]): the pool offers no
//! host, and a waiter whose changes were in a failed commit learns it at
//! once ([`NotDurable::Failed`]) instead of waiting out its limit, so its
//! caller can answer UNAVAILABLE and undo what was never confirmed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::store::{HostRecord, LeaseRecord, LeaseStore};

/// Pause before the first retry of a failed commit; it doubles with each
/// failure in a row, up to [`RETRY_MAX`].
const RETRY_AFTER: Duration = Duration::from_millis(200);
/// Longest pause between two retries of a failing store.
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Whether the store takes commits, as the pool and the ops endpoint see it.
#[derive(Debug, Default)]
pub struct Health {
    failing: AtomicBool,
    /// Why the last commit failed; `None` once one succeeds.
    why: Mutex<Option<String>>,
    /// Commits that failed since the start.
    failures: AtomicU64,
}

impl Health {
    /// Why the store is failing, or `None` while it takes commits.
    pub fn failing(&self) -> Option<String> {
        if !self.failing.load(Ordering::Acquire) {
            return None;
        }
        self.why.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Cheap check, for the scheduler (called under the pool's lock).
    pub fn is_failing(&self) -> bool {
        self.failing.load(Ordering::Acquire)
    }

    /// Commits that failed since the start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    fn failed(&self, why: String) {
        *self.why.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.failing.store(true, Ordering::Release);
    }

    fn works(&self) {
        self.failing.store(false, Ordering::Release);
        *self.why.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// How far the committer got: what is durable, and the newest change a
/// failed commit held (waiters up to it learn of the failure).
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    durable: u64,
    failed: u64,
}

#[derive(Default)]
struct Batch {
    /// Lease id -> the record to write, or `None` to delete it.
    changes: BTreeMap<String, Option<LeaseRecord>>,
    /// Host id -> the record to write, or `None` to delete it.
    hosts: BTreeMap<String, Option<HostRecord>>,
    /// Sequence number of the newest change in `changes` (or committed).
    enqueued: u64,
    /// The committer is to finish what is pending and exit.
    closing: bool,
    /// Message of the last failed commit, cleared by the next success.
    failing: Option<String>,
}

struct Shared {
    batch: Mutex<Batch>,
    /// Wakes the committer when changes arrive.
    work: Condvar,
    /// Highest sequence number known to be durable, and the highest one
    /// a failed commit held.
    progress: watch::Sender<Progress>,
    health: Arc<Health>,
    /// Wakes blocking waiters (`wait_blocking`) after a commit.
    done: Condvar,
}

impl Shared {
    fn batch(&self) -> MutexGuard<'_, Batch> {
        self.batch.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The store's committer thread and its pending batch.
pub(crate) struct Committer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Why a wait for durability ended without it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotDurable {
    #[error("the lease store did not confirm a write within {0:?}: {1}")]
    Timeout(Duration, String),
    /// The commit that held the change failed; it is retried, but the
    /// answer that waited for it cannot be given.
    #[error(
        "the lease store cannot record this change now ({0}); retry the call (a retried acquire with the same build id is safe)"
    )]
    Failed(String),
    #[error("the lease store's committer has stopped")]
    Stopped,
}

impl Committer {
    pub(crate) fn start(store: Arc<dyn LeaseStore>) -> Self {
        let shared = Arc::new(Shared {
            batch: Mutex::new(Batch::default()),
            work: Condvar::new(),
            progress: watch::channel(Progress::default()).0,
            health: Arc::new(Health::default()),
            done: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("berth-store".into())
            .spawn(move || run(&s, &*store))
            .expect("spawning the store committer thread");
        Self {
            shared,
            thread: Some(thread),
        }
    }

    /// Adds changes to the pending batch; returns their sequence number.
    /// Cheap: called with the pool's lock held.
    pub(crate) fn enqueue(
        &self,
        put: impl IntoIterator<Item = LeaseRecord>,
        delete: impl IntoIterator<Item = String>,
        hosts: impl IntoIterator<Item = (String, Option<HostRecord>)>,
    ) -> u64 {
        let mut b = self.shared.batch();
        for r in put {
            b.changes.insert(r.id.clone(), Some(r));
        }
        for id in delete {
            b.changes.insert(id, None);
        }
        for (id, r) in hosts {
            b.hosts.insert(id, r);
        }
        b.enqueued += 1;
        let seq = b.enqueued;
        drop(b);
        self.shared.work.notify_one();
        seq
    }

    /// Whether the store takes commits.
    pub(crate) fn health(&self) -> &Arc<Health> {
        &self.shared.health
    }

    /// The sequence number of the newest change enqueued so far.
    pub(crate) fn enqueued(&self) -> u64 {
        self.shared.batch().enqueued
    }

    /// Waits until everything enqueued up to `seq` is durable. Fails as
    /// soon as a commit holding `seq` failed (the records stay pending and
    /// are retried), or after `limit`.
    pub(crate) async fn wait(&self, seq: u64, limit: Duration) -> Result<(), NotDurable> {
        let mut rx = self.shared.progress.subscribe();
        match tokio::time::timeout(limit, rx.wait_for(|p| p.durable >= seq || p.failed >= seq))
            .await
        {
            Ok(Ok(p)) if p.durable >= seq => Ok(()),
            Ok(Ok(_)) => Err(NotDurable::Failed(
                self.shared
                    .health
                    .failing()
                    .unwrap_or_else(|| "a commit failed".into()),
            )),
            Ok(Err(_)) => Err(NotDurable::Stopped),
            Err(_) => {
                let why = self
                    .shared
                    .batch()
                    .failing
                    .clone()
                    .unwrap_or_else(|| "commits are slow".into());
                Err(NotDurable::Timeout(limit, why))
            }
        }
    }

    /// [`Committer::wait`] for callers outside the runtime (start-up,
    /// tests): waits at most `limit` for `seq` to be durable, however many
    /// commits fail meanwhile; returns whether it is.
    pub(crate) fn wait_blocking(&self, seq: u64, limit: Duration) -> bool {
        let until = std::time::Instant::now() + limit;
        let mut b = self.shared.batch();
        loop {
            if self.shared.progress.borrow().durable >= seq {
                return true;
            }
            let left = until.saturating_duration_since(std::time::Instant::now());
            if b.closing || left.is_zero() {
                return false;
            }
            b = self
                .shared
                .done
                .wait_timeout(b, left.min(RETRY_AFTER))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Drop for Committer {
    /// Writes what is pending, then stops the thread.
    fn drop(&mut self) {
        self.shared.batch().closing = true;
        self.shared.work.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(shared: &Shared, store: &dyn LeaseStore) {
    let mut pause = RETRY_AFTER;
    loop {
        let (changes, hosts, seq) = {
            let mut b = shared.batch();
            while b.changes.is_empty() && b.hosts.is_empty() && !b.closing {
                b = shared.work.wait(b).unwrap_or_else(|e| e.into_inner());
            }
            if b.changes.is_empty() && b.hosts.is_empty() {
                return;
            }
            (
                std::mem::take(&mut b.changes),
                std::mem::take(&mut b.hosts),
                b.enqueued,
            )
        };
        let mut put = Vec::new();
        let mut delete = Vec::new();
        for (id, r) in &changes {
            match r {
                Some(r) => put.push(r.clone()),
                None => delete.push(id.clone()),
            }
        }
        let host_changes: Vec<(String, Option<HostRecord>)> =
            hosts.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let started = std::time::Instant::now();
        match store.commit(&put, &delete, &host_changes) {
            Ok(()) => {
                debug!(seq, leases = changes.len(), took = ?started.elapsed(), "leases committed");
                let mut b = shared.batch();
                if b.failing.take().is_some() {
                    info!("writing leases to the store works again; hosts are offered again");
                }
                shared.health.works();
                pause = RETRY_AFTER;
                // Published under the batch lock: `wait_blocking` checks
                // under it too, so its wake-up cannot be missed.
                shared.progress.send_modify(|p| p.durable = seq);
                drop(b);
                shared.done.notify_all();
            }
            Err(e) => {
                let mut b = shared.batch();
                if b.failing.is_none() {
                    error!(error = %e, leases = changes.len(), "writing leases to the store failed; no host is offered until a commit succeeds; retrying");
                } else {
                    // A reminder per retry, at most one per `RETRY_MAX`.
                    warn!(error = %e, leases = changes.len(), retry_in = ?pause, "the lease store is still failing");
                }
                b.failing = Some(e.to_string());
                shared.health.failed(e.to_string());
                shared
                    .progress
                    .send_modify(|p| p.failed = p.failed.max(seq));
                // Newer changes to the same lease win over the failed ones.
                for (id, r) in changes {
                    b.changes.entry(id).or_insert(r);
                }
                for (id, r) in hosts {
                    b.hosts.entry(id).or_insert(r);
                }
                let closing = b.closing;
                drop(b);
                if closing {
                    // Nobody will wait any longer; do not spin at exit.
                    return;
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(RETRY_MAX);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::{MemStore, StoreError};
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn rec(id: &str, state: &str) -> LeaseRecord {
        LeaseRecord {
            id: id.into(),
            build_id: "b".into(),
            tenant: "t".into(),
            state: state.into(),
            host_id: String::new(),
            host_addr: String::new(),
            docker_host: String::new(),
            ttl_ns: 1,
            deadline_ns: None,
            created_ns: 1,
            message: String::new(),
            wipe: None,
            timeline: Vec::new(),
            key: String::new(),
            key_locked: false,
        }
    }

    /// A store that fails its first `fail` commits, and every commit while
    /// `broken` (a full disk), and counts the others.
    pub(crate) struct Flaky {
        pub(crate) inner: MemStore,
        fail: AtomicUsize,
        pub(crate) broken: std::sync::atomic::AtomicBool,
        commits: AtomicUsize,
    }

    impl LeaseStore for Flaky {
        fn commit(
            &self,
            put: &[LeaseRecord],
            delete: &[String],
            hosts: &[crate::store::HostChange],
        ) -> Result<(), StoreError> {
            if self.broken.load(Ordering::SeqCst)
                || self
                    .fail
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
            {
                return Err(StoreError::Db {
                    op: "commit",
                    source: Box::new(redb::Error::Io(std::io::Error::other(
                        "No space left on disk",
                    ))),
                });
            }
            self.commits.fetch_add(1, Ordering::SeqCst);
            self.inner.commit(put, delete, hosts)
        }
        fn load(&self) -> Result<crate::store::Loaded<LeaseRecord>, StoreError> {
            self.inner.load()
        }
        fn load_hosts(&self) -> Result<crate::store::Loaded<HostRecord>, StoreError> {
            self.inner.load_hosts()
        }
        fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
            self.inner.put_meta(key, value)
        }
        fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.get_meta(key)
        }
    }

    pub(crate) fn flaky(fail: usize) -> Arc<Flaky> {
        Arc::new(Flaky {
            inner: MemStore::default(),
            fail: AtomicUsize::new(fail),
            broken: std::sync::atomic::AtomicBool::new(false),
            commits: AtomicUsize::new(0),
        })
    }

    #[tokio::test]
    async fn the_newest_change_of_a_lease_wins_and_deletes_apply() {
        let store = flaky(0);
        let c = Committer::start(store.clone());
        c.enqueue([rec("a", "queued"), rec("b", "active")], [], []);
        c.enqueue([rec("a", "active")], ["b".to_owned()], []);
        let seq = c.enqueue([rec("c", "queued")], [], []);
        c.wait(seq, Duration::from_secs(5)).await.unwrap();
        let mut got: Vec<(String, String)> = store
            .load()
            .unwrap()
            .records
            .into_iter()
            .map(|r| (r.id, r.state))
            .collect();
        got.sort();
        assert_eq!(
            got,
            vec![("a".into(), "active".into()), ("c".into(), "queued".into())]
        );
        // Three batches may take fewer commits, never more.
        assert!(store.commits.load(Ordering::SeqCst) <= 3);
    }

    #[tokio::test]
    async fn a_failed_commit_is_retried_and_waiters_learn_why_meanwhile() {
        let store = flaky(0);
        store.broken.store(true, Ordering::SeqCst);
        let c = Committer::start(store.clone());
        assert_eq!(c.health().failing(), None);
        let seq = c.enqueue([rec("a", "active")], [], []);
        // The waiter hears of the failure at once, not after its limit.
        let err = c.wait(seq, Duration::from_secs(60)).await.unwrap_err();
        assert!(
            matches!(&err, NotDurable::Failed(why) if why.contains("No space")),
            "{err}"
        );
        assert!(c.health().failing().is_some_and(|w| w.contains("No space")));
        // A newer change enqueued while failing: its commit fails too...
        let seq = c.enqueue([rec("a", "released")], [], []);
        let err = c.wait(seq, Duration::from_secs(60)).await.unwrap_err();
        assert!(matches!(&err, NotDurable::Failed(_)), "{err}");
        assert!(c.health().failures() >= 2);
        assert!(store.load().unwrap().records.is_empty());
        // ...and once the store works the retry writes it, not the older one.
        store.broken.store(false, Ordering::SeqCst);
        assert!(c.wait_blocking(seq, Duration::from_secs(30)));
        c.wait(seq, Duration::from_secs(1)).await.unwrap();
        let stored = store.load().unwrap().records;
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].state, "released");
        // A success clears the failure.
        assert_eq!(c.health().failing(), None);
    }

    #[test]
    fn dropping_the_committer_writes_what_is_pending() {
        let store = flaky(0);
        let c = Committer::start(store.clone());
        for i in 0..100 {
            c.enqueue([rec(&format!("l{i}"), "active")], [], []);
        }
        drop(c);
        assert_eq!(store.load().unwrap().records.len(), 100);
    }

    #[test]
    fn blocking_wait_returns_once_durable() {
        let store = flaky(1);
        let c = Committer::start(store.clone());
        let seq = c.enqueue([rec("a", "active")], [], []);
        assert!(c.wait_blocking(seq, Duration::from_secs(30)));
        assert_eq!(store.load().unwrap().records.len(), 1);
        assert!(c.enqueued() >= seq);
    }

    #[test]
    fn blocking_wait_gives_up_after_its_limit_while_the_store_fails() {
        let store = flaky(usize::MAX);
        let c = Committer::start(store.clone());
        let seq = c.enqueue([rec("a", "active")], [], []);
        assert!(!c.wait_blocking(seq, Duration::from_millis(300)));
        assert!(c.health().is_failing());
        assert!(store.load().unwrap().records.is_empty());
        // Dropping a committer whose store never works does not hang.
        drop(c);
    }
}
