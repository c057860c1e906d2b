//! `LeaseService`, what CI calls: Acquire (queue, wait for a host, sign the
//! lease's client certificate), Renew, Release, Get, Find (a build's lease
//! by build id: where a waiting build stands in the queue). The caller's
//! tenant comes from `auth`; every answer that reports a change waits until
//! the change is durable (`Pool::durable`). Each call counts against
//! `--max-requests` (see `limit`).

use berth_tls::KeyId;
use std::time::Duration;

use berth_proto::v1 as pb;
use berth_proto::v1::lease_service_server::LeaseService;
use tokio::time::Instant;
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, info_span};

use super::{Services, auth, signing_error};
use crate::clock::Now;
use crate::error::Error;
use crate::lease::LeaseState;
use crate::pool::Pending;
use crate::validate;

impl Services {
    /// The lease's client certificate, valid from `now` until its deadline.
    fn lease_cert(
        &self,
        lease: &pb::Lease,
        csr: &berth_tls::ca::ParsedCsr,
        now: Now,
    ) -> Result<String, Error> {
        let deadline = lease
            .deadline
            .as_ref()
            .and_then(berth_proto::to_system_time)
            .ok_or(Error::Internal("an active lease without a deadline"))?;
        self.ca
            .sign_lease_parsed(csr, &lease.lease_id, now.wall, deadline)
            .map_err(signing_error)
    }

    /// Waits until `pending` leaves the queue (or the coordinator stops).
    async fn wait_while_queued(&self, pending: &mut Pending) -> Result<(), Error> {
        while *pending.state.borrow_and_update() == LeaseState::Queued {
            tokio::select! {
                changed = pending.state.changed() => {
                    if changed.is_err() {
                        // The lease record was dropped from history.
                        return Err(Error::LeaseNotFound(pending.lease_id.clone()));
                    }
                }
                () = self.shutdown.cancelled() => return Err(Error::ShuttingDown),
            }
        }
        Ok(())
    }

    /// Acquire after validation: queue, wait for the outcome, sign.
    async fn acquire_for(
        &self,
        tenant: &str,
        build_id: &str,
        csr: &berth_tls::ca::ParsedCsr,
        key: KeyId,
        ttl: Duration,
        wait: Duration,
    ) -> Result<pb::AcquireResponse, Error> {
        let started = Instant::now();
        let mut pending = self
            .pool
            .acquire(tenant, build_id, key, ttl, wait, Now::system())?;

        let span = info_span!("acquire", lease_id = %pending.lease_id, build_id = %build_id);
        async {
            loop {
                // Answered once a host is assigned and the assignment is
                // durable, without waiting for the agent: its front holds
                // a connection that arrives before the lease does.
                self.wait_while_queued(&mut pending).await?;
                let Some(lease) = self.pool.outcome(&pending.lease_id)? else {
                    continue;
                };
                let assigned = started.elapsed();
                // A retry with another key may have moved the pin while this
                // call waited: a certificate is issued only for the key in force.
                self.pool.check_key(&pending.lease_id, key)?;
                // Signed while the lease's records are being committed.
                let client_cert_pem = self.lease_cert(&lease, csr, Now::system())?;
                let signed = started.elapsed();
                if let Err(e) = self.pool.durable().await {
                    // Nobody gets this certificate: the lease must not keep
                    // its host (unless an earlier answer delivered it).
                    self.pool
                        .undo_unanswered(&pending.lease_id, &e.to_string(), Now::system());
                    return Err(e);
                }
                if !self.pool.answering(&pending.lease_id, &lease.host_id)? {
                    // Its host turned it down before the answer left: it
                    // is queued for another one.
                    continue;
                }
                // Where an answer's time goes (`RUST_LOG=berth_coordinator::api=debug`).
                debug!(
                    assigned_us = assigned.as_micros(),
                    signed_us = signed.as_micros(),
                    durable_us = started.elapsed().as_micros(),
                    "acquire answered"
                );
                let build_cache = self
                    .cache
                    .as_ref()
                    .map(|c| c.for_lease(tenant, &pending.lease_id));
                return Ok(pb::AcquireResponse {
                    lease: Some(lease),
                    client_cert_pem,
                    ca_pem: self.ca.cert_pem().to_owned(),
                    build_cache,
                });
            }
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
        let received = Instant::now();
        let caller = auth::caller(&req)?;
        // Held while the call waits for a host.
        let _call = self.requests.enter()?;
        let req = req.into_inner();
        let cfg = self.pool.config();
        validate::id("build_id", &req.build_id)?;
        // Checked before queueing: a bad CSR must not cost a host. Parsed
        // once; the lease certificate is signed from it.
        let csr = berth_tls::ca::parse_csr(&req.csr_pem).map_err(signing_error)?;
        let key = KeyId::of_csr_pem(&req.csr_pem).map_err(signing_error)?;
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
        debug!(
            checks_us = started.duration_since(received).as_micros(),
            "acquire request checked"
        );
        let pool_metrics = self.pool.metrics();
        let result = self
            .acquire_for(&caller.tenant, &req.build_id, &csr, key, ttl, wait)
            .await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(Error::NoHost(_)) => "no-host",
            Err(_) => "error",
        };
        pool_metrics.observe_acquire(started.elapsed(), outcome);
        Ok(Response::new(result?))
    }

    async fn renew(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        let caller = auth::caller(&req)?;
        let _call = self.requests.enter()?;
        let req = req.into_inner();
        let cfg = self.pool.config();
        let lid = validate::lease_id(&req.lease_id)?;
        let (csr, key) = if req.csr_pem.is_empty() {
            (None, None)
        } else {
            (
                Some(berth_tls::ca::parse_csr(&req.csr_pem).map_err(signing_error)?),
                Some(KeyId::of_csr_pem(&req.csr_pem).map_err(signing_error)?),
            )
        };
        let ttl = validate::duration(
            "ttl",
            req.ttl.as_ref(),
            Some(cfg.default_ttl),
            false,
            cfg.max_ttl,
        )?;
        let now = Now::system();
        let lease = self.pool.renew(&caller.tenant, &lid, key, ttl, now)?;
        let (client_cert_pem, ca_pem) = match &csr {
            Some(csr) if lease.state == pb::LeaseState::Active as i32 => (
                self.lease_cert(&lease, csr, now)?,
                self.ca.cert_pem().to_owned(),
            ),
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
        let _call = self.requests.enter()?;
        let lid = validate::lease_id(&req.into_inner().lease_id)?;
        let lease = self.pool.release(&caller.tenant, &lid, Now::system())?;
        self.pool.durable().await?;
        Ok(Response::new(pb::ReleaseResponse { lease: Some(lease) }))
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let caller = auth::caller(&req)?;
        let _call = self.requests.enter()?;
        let lid = validate::lease_id(&req.into_inner().lease_id)?;
        let lease = self.pool.get(&caller.tenant, &lid)?;
        Ok(Response::new(pb::GetResponse { lease: Some(lease) }))
    }

    async fn find(
        &self,
        req: Request<pb::FindRequest>,
    ) -> Result<Response<pb::FindResponse>, Status> {
        let caller = auth::caller(&req)?;
        let _call = self.requests.enter()?;
        let build_id = req.into_inner().build_id;
        validate::id("build_id", &build_id)?;
        let lease = self.pool.find(&caller.tenant, &build_id)?;
        Ok(Response::new(pb::FindResponse { lease: Some(lease) }))
    }
}
