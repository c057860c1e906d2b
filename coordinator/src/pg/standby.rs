//! What a standby coordinator serves: gRPC health (the process is up; the
//! pool's services are NOT_SERVING) and, for every call of CI, operators
//! and agents, UNAVAILABLE with the leader's address, in the message and
//! in the `berth-leader` trailer. Clients given several coordinator
//! addresses move on to the next one; nothing is answered from a standby's
//! view of the pool, which it does not have.

use std::pin::Pin;
use std::sync::Arc;

use berth_proto::v1 as pb;
use berth_proto::v1::admin_service_server::{AdminService, AdminServiceServer};
use berth_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use berth_proto::v1::lease_service_server::{LeaseService, LeaseServiceServer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::RunError;

/// The metadata key that carries the leader's address.
pub const LEADER_KEY: &str = "berth-leader";

/// The answer of a standby; `leader` is the current leader's address
/// (empty while none is elected).
#[derive(Debug, Clone)]
pub struct Standby {
    pub leader: watch::Receiver<String>,
}

impl Standby {
    fn unavailable(&self) -> Status {
        let leader = self.leader.borrow().clone();
        unavailable(&leader)
    }
}

/// UNAVAILABLE naming `leader` (empty: none elected yet).
pub fn unavailable(leader: &str) -> Status {
    if leader.is_empty() {
        return Status::unavailable(
            "this coordinator is a standby and no leader is elected yet; retry shortly",
        );
    }
    let mut s = Status::unavailable(format!(
        "this coordinator is a standby; the leader is at {leader}"
    ));
    if let Ok(v) = leader.parse() {
        s.metadata_mut().insert(LEADER_KEY, v);
    }
    s
}

type Answer<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl LeaseService for Standby {
    async fn acquire(&self, _: Request<pb::AcquireRequest>) -> Answer<pb::AcquireResponse> {
        Err(self.unavailable())
    }
    async fn renew(&self, _: Request<pb::RenewRequest>) -> Answer<pb::RenewResponse> {
        Err(self.unavailable())
    }
    async fn release(&self, _: Request<pb::ReleaseRequest>) -> Answer<pb::ReleaseResponse> {
        Err(self.unavailable())
    }
    async fn get(&self, _: Request<pb::GetRequest>) -> Answer<pb::GetResponse> {
        Err(self.unavailable())
    }
    async fn find(&self, _: Request<pb::FindRequest>) -> Answer<pb::FindResponse> {
        Err(self.unavailable())
    }
}

#[tonic::async_trait]
impl AdminService for Standby {
    async fn list_hosts(&self, _: Request<pb::ListHostsRequest>) -> Answer<pb::ListHostsResponse> {
        Err(self.unavailable())
    }
    async fn list_leases(
        &self,
        _: Request<pb::ListLeasesRequest>,
    ) -> Answer<pb::ListLeasesResponse> {
        Err(self.unavailable())
    }
    async fn drain_host(&self, _: Request<pb::DrainHostRequest>) -> Answer<pb::DrainHostResponse> {
        Err(self.unavailable())
    }
    async fn pool_stats(&self, _: Request<pb::PoolStatsRequest>) -> Answer<pb::PoolStatsResponse> {
        Err(self.unavailable())
    }
}

type AgentStream = Pin<Box<dyn Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for Standby {
    type ConnectStream = AgentStream;
    async fn connect(
        &self,
        _: Request<Streaming<pb::AgentMessage>>,
    ) -> Answer<Self::ConnectStream> {
        Err(self.unavailable())
    }
}

/// Serves the standby's answers on `listener` until `stop` fires.
pub async fn serve(
    listener: TcpListener,
    ca: Arc<berth_tls::Ca>,
    names: Vec<String>,
    leader: watch::Receiver<String>,
    stop: CancellationToken,
) -> Result<(), RunError> {
    let cert = Arc::new(
        berth_tls::server::RotatingCert::new(ca, names, std::time::SystemTime::now())
            .map_err(RunError::Ca)?,
    );
    let tls = berth_tls::server::coordinator_server_config(cert.clone()).map_err(RunError::Ca)?;
    let rotation = tokio::spawn(crate::listener::rotate(cert, stop.clone()));
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_not_serving::<LeaseServiceServer<Standby>>()
        .await;
    health
        .set_not_serving::<AgentServiceServer<Standby>>()
        .await;
    health
        .set_not_serving::<AdminServiceServer<Standby>>()
        .await;
    let standby = Standby { leader };
    let incoming = crate::listener::incoming(listener, tls, stop.clone());
    let server = crate::listener::server()
        .add_service(health_service)
        .add_service(LeaseServiceServer::new(standby.clone()))
        .add_service(AgentServiceServer::new(standby.clone()))
        .add_service(AdminServiceServer::new(standby))
        .serve_with_incoming_shutdown(incoming, stop.cancelled());
    let result = crate::listener::until_drained(server, &stop).await;
    stop.cancel();
    let _ = rotation.await;
    Ok(result?)
}
