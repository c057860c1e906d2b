//! `AdminService`, what operators call (an admin tenant only, see `auth`):
//! list hosts and leases, drain a host, the pool at a glance. Each call
//! counts against `--max-requests` (see `limit`).

use berth_proto::v1 as pb;
use berth_proto::v1::admin_service_server::AdminService;
use tonic::{Request, Response, Status};

use super::Services;
use crate::clock::Now;
use crate::validate;

#[tonic::async_trait]
impl AdminService for Services {
    async fn list_hosts(
        &self,
        _req: Request<pb::ListHostsRequest>,
    ) -> Result<Response<pb::ListHostsResponse>, Status> {
        let _call = self.requests.enter()?;
        Ok(Response::new(pb::ListHostsResponse {
            hosts: self.pool.list_hosts(),
        }))
    }

    async fn list_leases(
        &self,
        req: Request<pb::ListLeasesRequest>,
    ) -> Result<Response<pb::ListLeasesResponse>, Status> {
        let _call = self.requests.enter()?;
        Ok(Response::new(pb::ListLeasesResponse {
            leases: self.pool.list_leases(req.into_inner().include_ended),
        }))
    }

    async fn drain_host(
        &self,
        req: Request<pb::DrainHostRequest>,
    ) -> Result<Response<pb::DrainHostResponse>, Status> {
        let _call = self.requests.enter()?;
        let req = req.into_inner();
        validate::id("host_id", &req.host_id)?;
        validate::text("reason", &req.reason, 1024)?;
        let host = self.pool.drain(&req.host_id, &req.reason, Now::system())?;
        self.pool.durable().await?;
        Ok(Response::new(pb::DrainHostResponse { host: Some(host) }))
    }

    async fn pool_stats(
        &self,
        _req: Request<pb::PoolStatsRequest>,
    ) -> Result<Response<pb::PoolStatsResponse>, Status> {
        let _call = self.requests.enter()?;
        let mut stats = self.pool.stats(Now::system()).to_proto();
        if let Some(w) = &self.registries {
            stats.registries = w.probe().await;
        }
        Ok(Response::new(stats))
    }
}
