//! What the pool looks like from outside: leases and hosts as the API
//! returns them, the pool at a glance for AdminService.PoolStats and
//! `/metrics`, and the explanation a build gets when no host came. Read-only:
//! nothing here changes the pool. Condemned instances the pool keeps only
//! by id (`host::HostState::Barred`) are not shown.

use std::collections::BTreeMap;
use std::time::Duration;

use berth_proto::from_system_time;
use berth_proto::v1 as pb;

use super::{HostEntry, Inner, Now, Pool, PoolConfig};
use crate::lease::LeaseState;
use crate::timeline;

/// The pool at a glance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// (state name, hosts), by name.
    pub hosts_by_state: Vec<(String, u32)>,
    pub hosts_connected: u32,
    pub hosts_draining: u32,
    pub hosts_offerable: u32,
    /// (state name, leases), by name.
    pub leases_by_state: Vec<(String, u32)>,
    pub queue_length: u32,
    /// Elastic capacity: the hosts the pool should have now.
    pub desired_hosts: Option<u32>,
    /// Why the lease store fails to take commits; `None` while it works.
    /// Meanwhile no host is offered.
    pub store_error: Option<String>,
}

impl PoolStats {
    pub fn to_proto(&self) -> pb::PoolStatsResponse {
        pb::PoolStatsResponse {
            hosts_by_state: self.hosts_by_state.iter().cloned().collect(),
            hosts_connected: self.hosts_connected,
            hosts_draining: self.hosts_draining,
            hosts_offerable: self.hosts_offerable,
            leases_by_state: self.leases_by_state.iter().cloned().collect(),
            queue_length: self.queue_length,
            elastic: self.desired_hosts.is_some(),
            desired_hosts: self.desired_hosts.unwrap_or(0),
            // The pool holds no registry; AdminService adds them.
            registries: vec![],
            store_error: self.store_error.clone().unwrap_or_default(),
        }
    }
}

impl Pool {
    pub fn list_hosts(&self) -> Vec<pb::Host> {
        let g = self.lock();
        let mut hosts: Vec<_> = g.listed_hosts().map(host_view).collect();
        hosts.sort_by(|a, b| a.host_id.cmp(&b.host_id));
        hosts
    }

    pub fn list_leases(&self, include_ended: bool) -> Vec<pb::Lease> {
        let mut g = self.lock();
        let ids: Vec<String> = g
            .leases
            .values()
            .filter(|l| include_ended || !l.state.is_ended())
            .map(|l| l.id.clone())
            .collect();
        let mut leases: Vec<_> = ids
            .iter()
            .filter_map(|id| g.lease_view_placed(id))
            .collect();
        leases.sort_by(|a, b| {
            let key = |l: &pb::Lease| l.created_at.map(|t| (t.seconds, t.nanos));
            key(a).cmp(&key(b))
        });
        leases
    }

    /// The pool at a glance (AdminService.PoolStats, `/metrics`); hosts
    /// count as offerable as of `now`.
    pub fn stats(&self, now: Now) -> PoolStats {
        let g = self.lock();
        let mut hosts: BTreeMap<String, u32> = BTreeMap::new();
        let mut s = PoolStats {
            store_error: g.store_health.failing(),
            ..PoolStats::default()
        };
        for e in g.listed_hosts() {
            let name = berth_proto::names::host_state(e.host.listed_state() as i32);
            *hosts.entry(name).or_default() += 1;
            s.hosts_connected += u32::from(e.host.connected());
            s.hosts_draining += u32::from(e.host.draining);
            s.hosts_offerable += u32::from(
                e.host.offerable(now.mono, self.cfg.silence_limit())
                    && !g.retiring.contains_key(&e.reg.host_id)
                    && s.store_error.is_none(),
            );
        }
        let mut leases: BTreeMap<String, u32> = BTreeMap::new();
        for l in g.leases.values() {
            *leases.entry(l.state.name().to_owned()).or_default() += 1;
        }
        s.queue_length = u32::try_from(g.queued_leases()).unwrap_or(u32::MAX);
        s.desired_hosts = self
            .cfg
            .capacity
            .as_ref()
            .map(|c| crate::capacity::desired(c, &g.capacity_inputs(&self.cfg, now)));
        s.hosts_by_state = hosts.into_iter().collect();
        s.leases_by_state = leases.into_iter().collect();
        s
    }

    /// How many leases are waiting for a host.
    pub fn queue_len(&self) -> usize {
        self.lock().queued_leases()
    }
}

impl Inner {
    /// The hosts the views show.
    pub(super) fn listed_hosts(&self) -> impl Iterator<Item = &HostEntry> {
        self.hosts.values().filter(|e| e.host.listed())
    }

    pub(super) fn queued_leases(&self) -> usize {
        self.queue
            .iter()
            .filter(|id| self.leases.get(*id).map(|l| l.state) == Some(LeaseState::Queued))
            .count()
    }

    pub(super) fn lease_view(&self, lid: &str) -> Option<pb::Lease> {
        let l = self.leases.get(lid)?;
        Some(pb::Lease {
            lease_id: l.id.clone(),
            build_id: l.build_id.clone(),
            state: l.state.to_proto() as i32,
            host_id: l.host.clone().unwrap_or_default(),
            host_addr: l.host_addr.clone(),
            docker_host: l.docker_host.clone(),
            deadline: l.deadline_at.map(from_system_time),
            created_at: Some(from_system_time(l.created_at)),
            message: l.message.clone(),
            wipe: l.wipe.clone(),
            tenant: l.tenant.clone(),
            timeline: timeline::to_proto(&l.timeline),
            // Filled by `lease_view_placed` where the answer shows it.
            queue_position: 0,
            tenant_queued: 0,
        })
    }

    /// [`Inner::lease_view`] with, while the lease waits, its place in its
    /// tenant's queue.
    pub(super) fn lease_view_placed(&mut self, lid: &str) -> Option<pb::Lease> {
        let mut view = self.lease_view(lid)?;
        if let Some((place, queued)) = self.queue_place(lid) {
            view.queue_position = place;
            view.tenant_queued = queued;
        }
        Some(view)
    }

    /// Where queued lease `lid` stands in its tenant's queue: (place, 1
    /// being the next of its tenant; builds of its tenant waiting). `None`
    /// unless it is queued.
    pub(super) fn queue_place(&mut self, lid: &str) -> Option<(u32, u32)> {
        let l = self.leases.get(lid)?;
        if l.state != LeaseState::Queued {
            return None;
        }
        let leases = &self.leases;
        self.queue.place(&l.tenant, lid, |id| {
            leases.get(id).map(|l| l.state) == Some(LeaseState::Queued)
        })
    }

    /// Why lease `lid` found no host after `waited`.
    pub(super) fn no_host_message(&self, cfg: &PoolConfig, lid: &str, waited: Duration) -> String {
        let tenant = self
            .leases
            .get(lid)
            .map(|l| l.tenant.as_str())
            .unwrap_or("");
        let ahead = self
            .queue
            .of(tenant)
            .take_while(|id| id.as_str() != lid)
            .filter(|id| self.leases.get(*id).map(|l| l.state) == Some(LeaseState::Queued))
            .count();
        let others = self.queued_leases().saturating_sub(self.queued_of(tenant));
        let total = self.listed_hosts().count();
        let leased = self
            .listed_hosts()
            .filter(|e| e.host.lease.is_some())
            .count();
        let at_cap = cfg
            .limits(tenant)
            .max_active
            .filter(|max| self.held_by_tenant().get(tenant).copied().unwrap_or(0) >= *max)
            .map(|max| format!("; tenant {tenant} holds its max-active {max} hosts"))
            .unwrap_or_default();
        let store = self
            .store_health
            .failing()
            .map(|why| format!("; no host is offered while the lease store fails: {why}"))
            .unwrap_or_default();
        format!(
            "no host became ready within {} ({total} hosts in the pool, {leased} leased, {ahead} builds of tenant {tenant} were waiting ahead, {others} of other tenants{at_cap}{store})",
            humantime::format_duration(waited)
        )
    }
}

pub(super) fn host_view(e: &HostEntry) -> pb::Host {
    pb::Host {
        host_id: e.reg.host_id.clone(),
        host_addr: e.reg.host_addr.clone(),
        docker_host: e.reg.docker_host.clone(),
        state: e.host.listed_state() as i32,
        lease_id: e.host.lease.clone().unwrap_or_default(),
        resources: e.reg.resources,
        last_heartbeat: Some(from_system_time(e.last_heartbeat)),
        registered_at: Some(from_system_time(e.registered_at)),
        connected: e.host.connected(),
        draining: e.host.draining,
        agent_version: e.reg.agent_version.clone(),
        docker_version: e.reg.docker_version.clone(),
        provider: e.reg.provider.clone(),
    }
}
