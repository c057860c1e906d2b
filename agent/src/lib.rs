//! `berth-agent`: turns one machine (locally: one network namespace) into a
//! single-use remote Docker host for CI.
//!
//! [`run`] is the whole agent: it checks the configuration and the
//! credentials, picks the [`Provider`] ([`Local`], or
//! [`ec2::Ec2Provider`] with `--provider ec2`) and hands the host to the
//! [`assembly`], which learns the host's identity, starts the host's own
//! dockerd and self-checks it (it must answer, and it must listen on no
//! TCP port: [`docker::listeners`]), prints the `READY` line, then runs the
//! [`host::driver`] (the host state machine of [`host::state`]), the
//! coordinator [`link`], the status board and the watchers until the host
//! is terminated or the shutdown token fires; either way everything the host created is
//! destroyed, and every task of the host has ended, before `run` returns.
//! On EC2 a lifecycle poller feeds the Auto Scaling target lifecycle in, so
//! a warm-pool instance bootstraps but registers only once in service.
//! [`sweep`] removes what killed runs left behind.
//!
//! Boundaries: the binary (`main.rs`) only parses [`Config`], sets up tracing
//! and signals; dockerd is booted through [`docker::daemon::Daemon`], Docker
//! access goes through [`docker::client::DockerOps`], hosts come from and end
//! through [`Provider`], and the coordinator is only reached through the
//! link's channels, so each part (and their assembly) is testable with fakes.
//!
//! Credentials: the agent reaches the coordinator over TLS (trusting
//! `--ca`) with the pool join token (`--join-token-file`). It makes the
//! Docker front's key pair at start and sends only a CSR; the certificate
//! the coordinator signs (SAN = host address) comes back at registration.

pub mod assembly;
pub mod config;
pub mod docker;
pub mod host;
pub mod link;
pub mod ops;
pub mod provider;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

pub use assembly::LINK_FLUSH_TIMEOUT;
pub use config::{Cli, Command, Config, LogFormat, ProviderKind};
pub use host::state::HostState;
pub use provider::cleanup::{CleanupReport, sweep};
pub use provider::{Identity, Local, Provider};

use crate::link::Credentials;
use crate::link::net as linknet;
use crate::provider::{cleanup, ec2};

/// The agent's version, as registered.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Why the agent stopped other than by a clean termination.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid configuration: {0}")]
    Config(#[from] config::ConfigError),
    #[error("learning the host's identity: {0}")]
    Identity(#[source] provider::ProviderError),
    #[error(transparent)]
    Daemon(#[from] docker::daemon::DaemonError),
    #[error("booting the host took longer than {0:?}")]
    BootTimeout(Duration),
    #[error(transparent)]
    Driver(#[from] host::driver::DriverError),
    #[error("destroying the host after a failed boot: {0}")]
    Teardown(#[source] provider::ProviderError),
    #[error("setting up the link through the host's network: {0}")]
    LinkNet(#[from] linknet::LinkNetError),
    #[error("{0} is required: the agent cannot reach the coordinator without it")]
    MissingCredential(&'static str),
    #[error("credentials: {0}")]
    Credentials(#[from] berth_tls::TlsError),
    #[error("reading the Auto Scaling lifecycle: {0}")]
    Lifecycle(#[source] provider::ProviderError),
    /// The host has a past (it held a lease, or its data root holds what a
    /// fresh host would not): it is terminated, never offered.
    #[error("host {host_id} is not fresh ({why}); it was terminated instead of offered")]
    Burned { host_id: String, why: String },
    #[error("checking whether host {host_id} is fresh: {source}")]
    Holdings {
        host_id: String,
        #[source]
        source: docker::client::DockerError,
    },
}

/// Reads the coordinator's CA and the join token named in the config.
pub fn load_credentials(config: &Config) -> Result<Credentials, AgentError> {
    let ca = config
        .ca
        .as_deref()
        .ok_or(AgentError::MissingCredential("--ca"))?;
    let token = config
        .join_token_file
        .as_deref()
        .ok_or(AgentError::MissingCredential("--join-token-file"))?;
    Ok(Credentials {
        ca_pem: berth_tls::files::read_pem(ca)?,
        join_token: berth_tls::files::read_private_secret(token)?,
    })
}

/// The host's registry settings, with the pool registries' CA read from
/// `--registry-ca`.
pub fn load_registries(config: &Config) -> Result<docker::registries::Registries, AgentError> {
    let ca_pem = match &config.registry_ca {
        Some(path) => Some(berth_tls::files::read_pem(path)?),
        None => None,
    };
    Ok(docker::registries::Registries::new(
        &config.registry_mirrors,
        &config.pool_registries,
        ca_pem,
    )
    .map_err(config::ConfigError::from)?)
}

/// Runs the agent until its host is terminated (drained, lease over, wipe
/// failed, dockerd died) or `shutdown` fires; in every case the host is
/// destroyed before this returns. `Ok(())` means the host ended cleanly.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), AgentError> {
    tracing::info!(?config, version = AGENT_VERSION, "berth-agent starting");
    config.validate()?;
    // Before anything is created on the machine: without credentials the
    // host could never be offered.
    let credentials = load_credentials(&config)?;
    let registries = load_registries(&config)?;
    let started = Instant::now();
    match config.provider {
        ProviderKind::Local => {
            let provider = Arc::new(Local::new(&config));
            let resumed = match &config.resume_host {
                Some(host_id) => match provider.resume(host_id) {
                    Ok(identity) => Some(identity),
                    Err(e) => {
                        // What is left of the host cannot be trusted or
                        // used: destroy it, so the next start is a fresh host.
                        tracing::error!(error = %e, "cannot take the host over; destroying what is left of it");
                        let _ = provider.terminate().await;
                        return Err(AgentError::Identity(e));
                    }
                },
                None => None,
            };
            let boot = assembly::Boot {
                credentials,
                resumed,
                started,
                registries,
            };
            Box::pin(assembly::start(config, provider, boot, shutdown)).await
        }
        ProviderKind::Ec2 => {
            let api = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                // Boxed: the SDK's futures are deep enough to overflow
                // the compiler's layout query when nested inline.
                api = Box::pin(berth_aws::Ec2::from_env()) => api,
            };
            let provider = Arc::new(ec2::Ec2Provider::new(
                berth_aws::Imds::from_env(),
                api,
                config.state_dir.clone(),
                config.run_dir.clone(),
                config.prefix.clone(),
                &config.poweroff_command,
            ));
            let boot = assembly::Boot {
                credentials,
                resumed: None,
                started,
                registries,
            };
            Box::pin(assembly::start(config, provider, boot, shutdown)).await
        }
    }
}

/// Convenience for callers that only hold a [`Config`]: sweeps its state
/// and run dirs for its prefix.
pub async fn sweep_config(config: &Config) -> Result<CleanupReport, cleanup::CleanupError> {
    sweep(
        Path::new(&config.state_dir),
        Path::new(&config.run_dir),
        &config.prefix,
    )
    .await
}
