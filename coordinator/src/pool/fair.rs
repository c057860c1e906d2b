//! The queue of builds waiting for a host, fair between tenants: each
//! tenant has its own FIFO, and tenants with builds waiting take turns, a
//! turn being `weight` assignments (weighted round-robin). A tenant whose
//! queue empties leaves the turn order and rejoins at its end, so one
//! tenant's burst of requests cannot starve another's: the other's next
//! build waits for at most one turn of each tenant ahead of it.
//!
//! Entries are lease ids; whether an entry is still waiting is the pool's
//! call (an entry whose lease stopped waiting is stale): the scheduler drops
//! stale entries with [`FairQueue::drop_front`], which charges no turn.
//! Which tenants may be served at all (a tenant at its `max-active`) is the
//! scheduler's call too, passed in as a predicate.
//!
//! Where a build stands in its tenant's queue ([`FairQueue::place`]) is
//! what waiting builds poll for: the places of a tenant are counted in one
//! pass and kept until its queue changes, so a poll costs one lookup however
//! long the queue. A lease that stops waiting while still in the queue
//! changes the places of the entries behind it: the pool says so with
//! [`FairQueue::touch`].

use std::collections::{HashMap, VecDeque};

/// One tenant's waiting builds and what is left of its turn.
struct TenantQueue {
    ids: VecDeque<String>,
    /// Assignments left in the tenant's current turn.
    credit: u32,
    /// Places of the waiting entries (1 = next) and how many wait, counted
    /// since the queue last changed; `None` once it has.
    places: Option<(HashMap<String, u32>, u32)>,
}

/// Waiting lease ids, one FIFO per tenant, tenants served in turn.
#[derive(Default)]
pub(super) struct FairQueue {
    tenants: HashMap<String, TenantQueue>,
    /// Tenants with entries, in turn order: the front one is served next.
    turns: VecDeque<String>,
    /// Entries in every tenant's queue, stale ones included.
    len: usize,
}

impl FairQueue {
    /// Queues `lid` last in `tenant`'s queue (a new request).
    pub(super) fn push_back(&mut self, tenant: &str, lid: &str, weight: u32) {
        let q = self.queue_of(tenant, weight);
        q.ids.push_back(lid.to_owned());
        q.places = None;
        self.len += 1;
    }

    /// Queues `lid` first in `tenant`'s queue (a request handed back after
    /// an assignment failed: it keeps its place).
    pub(super) fn push_front(&mut self, tenant: &str, lid: &str, weight: u32) {
        let q = self.queue_of(tenant, weight);
        q.ids.push_front(lid.to_owned());
        q.places = None;
        self.len += 1;
    }

    fn queue_of(&mut self, tenant: &str, weight: u32) -> &mut TenantQueue {
        if !self.tenants.contains_key(tenant) {
            self.turns.push_back(tenant.to_owned());
        }
        self.tenants
            .entry(tenant.to_owned())
            .or_insert_with(|| TenantQueue {
                ids: VecDeque::new(),
                credit: weight.max(1),
                places: None,
            })
    }

    /// The entry to serve next: (tenant, lease id) of the first entry of the
    /// first tenant in turn order that `eligible` allows.
    pub(super) fn next(&self, mut eligible: impl FnMut(&str) -> bool) -> Option<(String, String)> {
        self.turns
            .iter()
            .filter(|t| eligible(t))
            .find_map(|t| Some((t.clone(), self.tenants.get(t)?.ids.front()?.clone())))
    }

    /// Drops `tenant`'s first entry without charging its turn (stale).
    pub(super) fn drop_front(&mut self, tenant: &str) {
        if let Some(q) = self.tenants.get_mut(tenant)
            && q.ids.pop_front().is_some()
        {
            q.places = None;
            self.len -= 1;
        }
        self.forget_if_empty(tenant);
    }

    /// Takes `tenant`'s first entry, which got a host: one assignment of its
    /// turn. A tenant whose turn is used up goes to the end of the order.
    pub(super) fn served(&mut self, tenant: &str, weight: u32) {
        let Some(q) = self.tenants.get_mut(tenant) else {
            return;
        };
        if q.ids.pop_front().is_some() {
            q.places = None;
            self.len -= 1;
        }
        q.credit = q.credit.saturating_sub(1);
        if q.credit == 0 {
            q.credit = weight.max(1);
            if let Some(i) = self.turns.iter().position(|t| t == tenant)
                && let Some(t) = self.turns.remove(i)
            {
                self.turns.push_back(t);
            }
        }
        self.forget_if_empty(tenant);
    }

    /// One of `tenant`'s entries stopped waiting (its lease left the
    /// queued state) while still in the queue: the places behind it moved.
    pub(super) fn touch(&mut self, tenant: &str) {
        if let Some(q) = self.tenants.get_mut(tenant) {
            q.places = None;
        }
    }

    /// Where `lid` stands among `tenant`'s entries that are still
    /// `waiting`: (place, 1 being the next; how many of the tenant wait).
    /// `None` if `lid` is not one of them. Counted once per change of the
    /// tenant's queue (see [`FairQueue::touch`]).
    pub(super) fn place(
        &mut self,
        tenant: &str,
        lid: &str,
        waiting: impl Fn(&str) -> bool,
    ) -> Option<(u32, u32)> {
        let q = self.tenants.get_mut(tenant)?;
        let (places, n) = q.places.get_or_insert_with(|| {
            let mut places = HashMap::new();
            let mut n = 0u32;
            for id in q.ids.iter().filter(|id| waiting(id)) {
                n = n.saturating_add(1);
                // An id queued twice keeps its first (best) place.
                places.entry(id.clone()).or_insert(n);
            }
            (places, n)
        });
        places.get(lid).map(|p| (*p, *n))
    }

    fn forget_if_empty(&mut self, tenant: &str) {
        if self.tenants.get(tenant).is_some_and(|q| q.ids.is_empty()) {
            self.tenants.remove(tenant);
            self.turns.retain(|t| t != tenant);
        }
    }

    /// Entries queued, stale ones included (an upper bound of the waiting).
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Every entry, stale ones included, tenant by tenant.
    pub(super) fn iter(&self) -> impl Iterator<Item = &String> {
        self.tenants.values().flat_map(|q| q.ids.iter())
    }

    /// `tenant`'s entries, oldest first, stale ones included.
    pub(super) fn of(&self, tenant: &str) -> impl Iterator<Item = &String> {
        self.tenants
            .get(tenant)
            .into_iter()
            .flat_map(|q| q.ids.iter())
    }

    /// Whether the bookkeeping agrees with itself (the invariant check):
    /// the turn order holds exactly the tenants with entries, once each, and
    /// `len` counts every entry.
    pub(super) fn consistent(&self) -> bool {
        let mut seen = std::collections::HashSet::new();
        self.turns.len() == self.tenants.len()
            && self.turns.iter().all(|t| seen.insert(t.as_str()))
            && self
                .turns
                .iter()
                .all(|t| self.tenants.get(t).is_some_and(|q| !q.ids.is_empty()))
            && self.len == self.tenants.values().map(|q| q.ids.len()).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// Serves `n` entries (every tenant eligible, weights from `weight`),
    /// returning the tenants served in order.
    fn serve(q: &mut FairQueue, n: usize, weight: impl Fn(&str) -> u32) -> Vec<String> {
        let mut out = vec![];
        for _ in 0..n {
            let Some((t, _)) = q.next(|_| true) else {
                break;
            };
            q.served(&t, weight(&t));
            assert!(q.consistent());
            out.push(t);
        }
        out
    }

    #[test]
    fn a_tenant_with_a_long_queue_does_not_starve_a_later_one() {
        let mut q = FairQueue::default();
        for i in 0..50 {
            q.push_back("a", &format!("a{i}"), 1);
        }
        for i in 0..5 {
            q.push_back("b", &format!("b{i}"), 1);
        }
        let order = serve(&mut q, 10, |_| 1);
        assert_eq!(order, ["a", "b", "a", "b", "a", "b", "a", "b", "a", "b"]);
        // Then a alone, in its own order.
        let (t, lid) = q.next(|_| true).unwrap();
        assert_eq!((t.as_str(), lid.as_str()), ("a", "a5"));
        assert_eq!(q.len(), 45);
    }

    #[test]
    fn fifo_within_a_tenant_and_turns_by_weight() {
        let mut q = FairQueue::default();
        for i in 0..6 {
            q.push_back("a", &format!("a{i}"), 2);
            q.push_back("b", &format!("b{i}"), 1);
        }
        let w = |t: &str| if t == "a" { 2 } else { 1 };
        let mut got = vec![];
        for _ in 0..9 {
            let (t, lid) = q.next(|_| true).unwrap();
            q.served(&t, w(&t));
            got.push(lid);
        }
        assert_eq!(got, ["a0", "a1", "b0", "a2", "a3", "b1", "a4", "a5", "b2"]);
        // a's queue is empty: it left the order; b goes on alone.
        assert_eq!(serve(&mut q, 10, w), ["b", "b", "b"]);
        assert_eq!(q.len(), 0);
        assert!(q.next(|_| true).is_none());
    }

    #[test]
    fn an_ineligible_tenant_is_passed_over_and_keeps_its_place() {
        let mut q = FairQueue::default();
        q.push_back("a", "a0", 1);
        q.push_back("a", "a1", 1);
        q.push_back("b", "b0", 1);
        q.push_back("b", "b1", 1);
        // a is at its max-active: b is served, a stays first in turn.
        let (t, lid) = q.next(|t| t != "a").unwrap();
        assert_eq!((t.as_str(), lid.as_str()), ("b", "b0"));
        q.served(&t, 1);
        assert_eq!(q.next(|_| true).unwrap().1, "a0");
        assert!(q.next(|_| false).is_none());
    }

    #[test]
    fn stale_entries_cost_no_turn_and_requeued_ones_keep_their_place() {
        let mut q = FairQueue::default();
        q.push_back("a", "a0", 1);
        q.push_back("a", "a1", 1);
        q.push_back("b", "b0", 1);
        q.drop_front("a"); // a0 stopped waiting
        assert!(q.consistent());
        assert_eq!(q.next(|_| true).unwrap().1, "a1");
        q.served("a", 1);
        assert_eq!(q.next(|_| true).unwrap().1, "b0");
        // An assignment of a1 failed: it is first of a's again; a rejoins
        // the order at its end.
        q.push_front("a", "a1", 1);
        q.served("b", 1);
        assert!(q.consistent());
        assert_eq!(q.next(|_| true).unwrap().1, "a1");
        assert_eq!(q.of("a").collect::<Vec<_>>(), ["a1"]);
        assert_eq!(q.iter().count(), 1);
        q.drop_front("a");
        assert!(q.consistent() && q.len() == 0 && q.next(|_| true).is_none());
    }

    #[test]
    fn places_count_only_waiting_entries_of_the_tenant_and_follow_every_change() {
        let mut q = FairQueue::default();
        for i in 0..3 {
            q.push_back("a", &format!("a{i}"), 1);
            q.push_back("b", &format!("b{i}"), 1);
        }
        let mut gone: HashSet<String> = HashSet::new();
        let place = |q: &mut FairQueue, gone: &HashSet<String>, lid: &str| {
            let tenant = &lid[..1];
            q.place(tenant, lid, |id| !gone.contains(id))
        };
        // Per tenant: b's entries do not count in a's places.
        assert_eq!(place(&mut q, &gone, "a0"), Some((1, 3)));
        assert_eq!(place(&mut q, &gone, "a2"), Some((3, 3)));
        assert_eq!(place(&mut q, &gone, "b1"), Some((2, 3)));
        assert_eq!(place(&mut q, &gone, "zz"), None);
        // Served: the ones behind move up.
        q.served("a", 1);
        assert_eq!(place(&mut q, &gone, "a0"), None);
        assert_eq!(place(&mut q, &gone, "a2"), Some((2, 2)));
        // A lease in the middle stops waiting (cancelled): the pool
        // touches the tenant, the entry no longer counts though it stays.
        gone.insert("b1".into());
        q.touch("b");
        assert_eq!(place(&mut q, &gone, "b2"), Some((2, 2)));
        assert_eq!(place(&mut q, &gone, "b1"), None);
        // A new request queues last; a handed-back one first.
        q.push_back("a", "a3", 1);
        q.push_front("a", "a9", 1);
        assert_eq!(place(&mut q, &gone, "a9"), Some((1, 4)));
        assert_eq!(place(&mut q, &gone, "a3"), Some((4, 4)));
        // A stale front entry dropped: nothing moves for the waiting ones.
        q.served("b", 1); // b0
        q.drop_front("b"); // b1, stale
        assert_eq!(place(&mut q, &gone, "b2"), Some((1, 1)));
        assert!(q.consistent());
    }
}
