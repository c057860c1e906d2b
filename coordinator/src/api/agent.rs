//! `AgentService`: one bidirectional stream per agent. The first message
//! must be `Register`; it is validated, put to the admission check
//! (`crate::admission`), the agent's server certificate is signed, and the
//! pool takes the host. A spawned reader then hands every later message to
//! the pool until the stream ends; what the coordinator sends back goes
//! through a bounded channel (a full one drops the agent, see `crate::pool`).

use std::pin::Pin;
use std::time::Duration;

use berth_proto::v1 as pb;
use berth_proto::v1::agent_service_server::AgentService;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, info_span, warn};

use super::{Services, signing_error};
use crate::clock::Now;
use crate::error::{Error, Protocol};
use crate::pool::{RegisteredTls, Registration};
use crate::validate;

/// How long a new agent stream has to send its `Register`.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages buffered towards one agent before it counts as too slow.
pub const AGENT_CHANNEL_DEPTH: usize = 64;
/// Share of an agent's certificate life after which it gets a new one.
pub const RENEW_AT: f64 = 2.0 / 3.0;
/// Wait before trying again when re-issuing a certificate failed.
const RENEW_RETRY: Duration = Duration::from_secs(60);

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
            .map_err(|_| Error::RegisterTimeout(REGISTER_TIMEOUT))??;
        let (reg, csr_pem) = match first.and_then(|m| m.msg) {
            Some(pb::agent_message::Msg::Register(r)) => {
                let csr_pem = r.csr_pem.clone();
                (Registration::from_proto(r)?, csr_pem)
            }
            Some(_) => return Err(Error::from(Protocol::FirstNotRegister).into()),
            None => return Err(Error::from(Protocol::EndedBeforeRegister).into()),
        };
        let addr = validate::host_addr(&reg.host_addr)?;
        // Before the CA signs anything and before the pool hears of it: a
        // refused agent gets no certificate and is never offered.
        self.verifier.verify(&reg, peer).await?;
        self.pool.admits(&reg)?;
        let validity = self.host_cert_validity;
        let server_cert_pem = self
            .ca
            .sign_host_for(&csr_pem, &reg.host_id, addr, Now::system().wall, validity)
            .map_err(signing_error)?;
        let tls = registered_tls(&self.ca, server_cert_pem);
        let host_id = reg.host_id.clone();
        let (tx, rx) = mpsc::channel(AGENT_CHANNEL_DEPTH);
        let conn_id = self.pool.register(reg, tls, tx, Now::system())?;
        let pool = self.pool.clone();
        let shutdown = self.shutdown.clone();
        let ca = self.ca.clone();
        let span = info_span!("agent", host_id = %host_id, conn_id, peer = ?peer);
        tokio::spawn(
            async move {
                // The agent's certificate is re-issued (from the CSR it
                // registered with, so for the same key and address) at
                // two thirds of its life, on this stream.
                let renew_every = validity.mul_f64(RENEW_AT);
                let mut renew_at = tokio::time::Instant::now() + renew_every;
                loop {
                    let msg = tokio::select! {
                        m = inbound.message() => m,
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep_until(renew_at) => {
                            let now = Now::system();
                            renew_at = match ca.sign_host_for(&csr_pem, &host_id, addr, now.wall, validity) {
                                Ok(pem) => {
                                    let tls = registered_tls(&ca, pem);
                                    if !pool.renew_host_cert(&host_id, conn_id, tls, now) {
                                        break;
                                    }
                                    tokio::time::Instant::now() + renew_every
                                }
                                Err(e) => {
                                    warn!(error = %e, "cannot re-issue the agent's certificate; retrying");
                                    tokio::time::Instant::now() + RENEW_RETRY
                                }
                            };
                            continue;
                        }
                    };
                    match msg {
                        Ok(Some(pb::AgentMessage { msg: Some(msg) })) => {
                            if let Err(e) =
                                pool.agent_message(&host_id, conn_id, msg, Now::system())
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
                pool.disconnect(&host_id, conn_id, Now::system());
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(
            ReceiverStream::new(rx).map(|m| Ok(*m)),
        )))
    }
}

/// What `Registered` carries for an agent whose front certificate is
/// `server_cert_pem`: that and the pool CA.
fn registered_tls(ca: &berth_tls::Ca, server_cert_pem: String) -> RegisteredTls {
    RegisteredTls {
        server_cert_pem,
        ca_pem: ca.cert_pem().to_owned(),
    }
}
