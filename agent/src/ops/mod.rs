//! What operators see of a host: [`status`] is the status endpoint
//! (`/healthz`, `/readyz`, `/status`, `/metrics`), [`stats`] samples the
//! host's resources for heartbeats and the status page.

pub mod stats;
pub mod status;
