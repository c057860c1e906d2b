//! Checking an agent's `Register` message before anything acts on it: ids,
//! addresses and free text bounded and well-formed, the host state and lease
//! id valid. A [`Registration`] is what the admission check
//! (`crate::admission`) and the pool receive; what the pool does with it is
//! `agent.rs`'s business.

use std::time::SystemTime;

use berth_proto::to_system_time;
use berth_proto::v1 as pb;

use berth_tls::KeyId;

use crate::error::Error;
use crate::validate;

/// A validated agent registration.
#[derive(Debug, Clone)]
pub struct Registration {
    pub host_id: String,
    pub host_addr: String,
    pub docker_host: String,
    pub provider: String,
    pub resources: Option<pb::Resources>,
    pub agent_version: String,
    pub docker_version: String,
    pub state: pb::HostState,
    pub lease_id: String,
    pub lease_deadline: Option<SystemTime>,
    /// The key of the host: its CSR's, whose self-signature proves the agent
    /// holds it. A host id is bound to the first key it registered with.
    pub key: Option<KeyId>,
    /// With `lease_id`: the key the agent's lease is pinned to.
    pub lease_key: Option<KeyId>,
}

/// The TLS part of `Registered`: the front's server certificate and the
/// pool CA (signed by the service before the host joins the pool). Sent to
/// the agent, not kept.
#[derive(Debug, Clone, Default)]
pub struct RegisteredTls {
    pub server_cert_pem: String,
    pub ca_pem: String,
}

impl Registration {
    /// Checks a `Register` message from the network.
    pub fn from_proto(r: pb::Register) -> Result<Self, Error> {
        validate::id("host_id", &r.host_id)?;
        validate::host_addr(&r.host_addr)?;
        validate::docker_host(&r.docker_host)?;
        for (field, v) in [
            ("provider", &r.provider),
            ("agent_version", &r.agent_version),
            ("docker_version", &r.docker_version),
            ("instance_type", &r.instance_type),
            ("zone", &r.zone),
        ] {
            validate::text(field, v, validate::MAX_ID_LEN)?;
        }
        let state = pb::HostState::try_from(r.state)
            .map_err(|_| Error::invalid("state", format!("unknown host state {}", r.state)))?;
        if !r.lease_id.is_empty() {
            validate::lease_id(&r.lease_id)?;
        }
        let lease_deadline = r.lease_deadline.as_ref().and_then(to_system_time);
        let key =
            KeyId::of_csr_pem(&r.csr_pem).map_err(|e| Error::invalid("csr_pem", e.to_string()))?;
        let lease_key = validate::optional_key("lease_key_sha256", &r.lease_key_sha256)?;
        Ok(Self {
            host_id: r.host_id,
            host_addr: r.host_addr,
            docker_host: r.docker_host,
            provider: r.provider,
            resources: r.resources,
            agent_version: r.agent_version,
            docker_version: r.docker_version,
            state,
            lease_id: r.lease_id,
            lease_deadline,
            key: Some(key),
            lease_key,
        })
    }

    /// What the pool keeps for a host it knows only by id (a restored
    /// lease's host, a condemned instance): no agent has said anything yet.
    pub(super) fn placeholder(host_id: &str) -> Self {
        Self {
            host_id: host_id.to_owned(),
            host_addr: String::new(),
            docker_host: String::new(),
            provider: String::new(),
            resources: None,
            agent_version: String::new(),
            docker_version: String::new(),
            state: pb::HostState::Unspecified,
            lease_id: String::new(),
            lease_deadline: None,
            key: None,
            lease_key: None,
        }
    }
}
