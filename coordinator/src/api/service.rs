//! The gRPC face of the pool: `LeaseService` for CI, `AgentService` for the
//! agents' streams, `AdminService` for operators. Handlers validate input,
//! call the pool and map its errors to status codes; they hold no state.
//! Authentication happened before a handler runs (`crate::api::auth`); the
//! handlers sign what the pool CA signs: the agent's server certificate at
//! registration, the lease's client certificate at acquire and renew.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use berth_proto::v1 as pb;
use berth_proto::v1::admin_service_server::AdminService;
use berth_proto::v1::agent_service_server::AgentService;
use berth_proto::v1::lease_service_server::LeaseService;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, info_span, warn};

use crate::admission::Verifier;
use crate::api::auth;
use crate::error::Error;
use crate::lease::LeaseState;
use crate::ops::metrics::Ec2Metrics;
use crate::pool::{Pool, RegisteredTls, Registration};
use crate::validate;

/// How long a new agent stream has to send its `Register`.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages buffered towards one agent before it counts as too slow.
pub const AGENT_CHANNEL_DEPTH: usize = 64;

#[derive(Clone)]
pub struct Services {
    pub pool: Arc<Pool>,
    pub ca: Arc<berth_tls::Ca>,
    pub shutdown: CancellationToken,
    /// Admits or refuses each registering agent (EC2: DescribeInstances).
    pub verifier: Arc<dyn Verifier>,
    /// Counters of the EC2 verification and the orphan sweeper.
    pub ec2_metrics: Arc<Ec2Metrics>,
}

/// A CSR problem is the caller's; anything else in signing is ours.
fn tls_status(e: berth_tls::TlsError) -> Status {
    match e {
        berth_tls::TlsError::BadCsr(reason) => Error::invalid("csr_pem", reason).into(),
        other => Status::internal(format!("signing failed: {other}")),
    }
}

impl Services {
    /// The lease's client certificate, valid until its deadline.
    fn lease_cert(
        &self,
        lease: &pb::Lease,
        csr: &berth_tls::ca::ParsedCsr,
    ) -> Result<String, Status> {
        let deadline = lease
            .deadline
            .as_ref()
            .and_then(berth_proto::to_system_time)
            .ok_or_else(|| Status::internal("an active lease without a deadline"))?;
        self.ca
            .sign_lease_parsed(csr, &lease.lease_id, SystemTime::now(), deadline)
            .map_err(tls_status)
    }

    /// Acquire after validation: queue, wait for the outcome, sign.
    async fn acquire_for(
        &self,
        tenant: &str,
        build_id: &str,
        csr: &berth_tls::ca::ParsedCsr,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Response<pb::AcquireResponse>, Status> {
        let mut pending = self
            .pool
            .acquire(tenant, build_id, ttl, wait, Instant::now())?;

        let span = info_span!("acquire", lease_id = %pending.lease_id, build_id = %build_id);
        async {
            loop {
                let state = *pending.state.borrow_and_update();
                if !matches!(state, LeaseState::Queued | LeaseState::Assigned) {
                    break;
                }
                tokio::select! {
                    changed = pending.state.changed() => {
                        if changed.is_err() {
                            // The lease record was dropped from history.
                            break;
                        }
                    }
                    () = self.shutdown.cancelled() => return Err(Error::ShuttingDown.into()),
                }
            }
            let lease = self.pool.outcome(&pending.lease_id)?;
            // Signed while the lease's records are being committed.
            let client_cert_pem = self.lease_cert(&lease, csr)?;
            self.pool.durable().await?;
            Ok(Response::new(pb::AcquireResponse {
                lease: Some(lease),
                client_cert_pem,
                ca_pem: self.ca.cert_pem().to_owned(),
            }))
        }
        .instrument(span)
        .await
    }
}

#[tonic::async_trait]
impl LeaseService for Services {
    async fn acquire(
        &self,
        req: Request<pb::AcquireRequest>,
    ) -> Result<Response<pb::AcquireResponse>, Status> {
        let caller = auth::caller(&req)?;
        let req = req.into_inner();
        let cfg = self.pool.config();
        validate::id("build_id", &req.build_id)?;
        // Checked before queueing: a bad CSR must not cost a host. Parsed
        // once; the lease certificate is signed from it.
        let csr = berth_tls::ca::parse_csr(&req.csr_pem).map_err(tls_status)?;
        let ttl = validate::duration(
            "ttl",
            req.ttl.as_ref(),
            Some(cfg.default_ttl),
            false,
            cfg.max_ttl,
        )?;
        let wait = validate::duration(
            "wait",
            req.wait.as_ref(),
            Some(Duration::ZERO),
            true,
            cfg.max_wait,
        )?;
        let started = Instant::now();
        let pool_metrics = self.pool.metrics();
        let result = self
            .acquire_for(&caller.tenant, &req.build_id, &csr, ttl, wait)
            .await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(s) if s.code() == tonic::Code::ResourceExhausted => "no-host",
            Err(_) => "error",
        };
        pool_metrics.observe_acquire(started.elapsed(), outcome);
        result
    }

    async fn renew(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        let caller = auth::caller(&req)?;
        let req = req.into_inner();
        let cfg = self.pool.config();
        let lid = validate::lease_id(&req.lease_id)?;
        let csr = if req.csr_pem.is_empty() {
            None
        } else {
            Some(berth_tls::ca::parse_csr(&req.csr_pem).map_err(tls_status)?)
        };
        let ttl = validate::duration(
            "ttl",
            req.ttl.as_ref(),
            Some(cfg.default_ttl),
            false,
            cfg.max_ttl,
        )?;
        let lease = self.pool.renew(&caller.tenant, &lid, ttl, Instant::now())?;
        let (client_cert_pem, ca_pem) = match &csr {
            Some(csr) if lease.state == pb::LeaseState::Active as i32 => {
                (self.lease_cert(&lease, csr)?, self.ca.cert_pem().to_owned())
            }
            _ => (String::new(), String::new()),
        };
        self.pool.durable().await?;
        Ok(Response::new(pb::RenewResponse {
            lease: Some(lease),
            client_cert_pem,
            ca_pem,
        }))
    }

    async fn release(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let caller = auth::caller(&req)?;
        let lid = validate::lease_id(&req.into_inner().lease_id)?;
        let lease = self.pool.release(&caller.tenant, &lid, Instant::now())?;
        self.pool.durable().await?;
        Ok(Response::new(pb::ReleaseResponse { lease: Some(lease) }))
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let caller = auth::caller(&req)?;
        let lid = validate::lease_id(&req.into_inner().lease_id)?;
        let lease = self.pool.get(&caller.tenant, &lid)?;
        Ok(Response::new(pb::GetResponse { lease: Some(lease) }))
    }
}

type AgentStream = Pin<Box<dyn Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for Services {
    type ConnectStream = AgentStream;

    async fn connect(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let peer = crate::listener::remote_addr(&req);
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no register message within 10s"))??;
        let (mut reg, csr_pem) = match first.and_then(|m| m.msg) {
            Some(pb::agent_message::Msg::Register(r)) => {
                let csr_pem = r.csr_pem.clone();
                (Registration::from_proto(r)?, csr_pem)
            }
            Some(_) => {
                return Err(Status::invalid_argument(
                    "the first message on an agent stream must be register",
                ));
            }
            None => {
                return Err(Status::invalid_argument(
                    "the agent stream ended before register",
                ));
            }
        };
        let addr = validate::host_addr(&reg.host_addr)?;
        // Before the CA signs anything and before the pool hears of it: a
        // refused agent gets no certificate and is never offered.
        self.verifier.verify(&reg, peer).await?;
        let server_cert_pem = self
            .ca
            .sign_host(&csr_pem, &reg.host_id, addr, SystemTime::now())
            .map_err(tls_status)?;
        reg.tls = RegisteredTls {
            server_cert_pem,
            ca_pem: self.ca.cert_pem().to_owned(),
        };
        let host_id = reg.host_id.clone();
        let (tx, rx) = mpsc::channel(AGENT_CHANNEL_DEPTH);
        let conn_id = self.pool.try_register(reg, tx, Instant::now())?;
        let pool = self.pool.clone();
        let shutdown = self.shutdown.clone();
        let span = info_span!("agent", host_id = %host_id, conn_id, peer = ?peer);
        tokio::spawn(
            async move {
                loop {
                    let msg = tokio::select! {
                        m = inbound.message() => m,
                        () = shutdown.cancelled() => break,
                    };
                    match msg {
                        Ok(Some(pb::AgentMessage { msg: Some(msg) })) => {
                            if let Err(e) =
                                pool.agent_message(&host_id, conn_id, msg, Instant::now())
                            {
                                warn!(error = %e, "bad message from agent; closing its stream");
                                break;
                            }
                        }
                        Ok(Some(pb::AgentMessage { msg: None })) => {
                            warn!("empty message from agent; closing its stream");
                            break;
                        }
                        Ok(None) => break,
                        Err(status) => {
                            warn!(error = %status, "agent stream failed");
                            break;
                        }
                    }
                }
                pool.disconnect(&host_id, conn_id, Instant::now());
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tonic::async_trait]
impl AdminService for Services {
    async fn list_hosts(
        &self,
        _req: Request<pb::ListHostsRequest>,
    ) -> Result<Response<pb::ListHostsResponse>, Status> {
        Ok(Response::new(pb::ListHostsResponse {
            hosts: self.pool.list_hosts(),
        }))
    }

    async fn list_leases(
        &self,
        req: Request<pb::ListLeasesRequest>,
    ) -> Result<Response<pb::ListLeasesResponse>, Status> {
        Ok(Response::new(pb::ListLeasesResponse {
            leases: self.pool.list_leases(req.into_inner().include_ended),
        }))
    }

    async fn drain_host(
        &self,
        req: Request<pb::DrainHostRequest>,
    ) -> Result<Response<pb::DrainHostResponse>, Status> {
        let req = req.into_inner();
        validate::id("host_id", &req.host_id)?;
        validate::text("reason", &req.reason, 1024)?;
        let host = self.pool.drain(&req.host_id, &req.reason)?;
        self.pool.durable().await?;
        Ok(Response::new(pb::DrainHostResponse { host: Some(host) }))
    }

    async fn pool_stats(
        &self,
        _req: Request<pb::PoolStatsRequest>,
    ) -> Result<Response<pb::PoolStatsResponse>, Status> {
        Ok(Response::new(self.pool.stats().to_proto()))
    }
}
