//! `berth-agent`: turns one machine (locally: one network namespace) into a
//! single-use remote Docker host for CI.
//!
//! [`run`] is the whole agent: learn the host's identity through the
//! [`Provider`], start the host's own dockerd and self-check it, print the
//! `READY` line, then run the [`driver`] (the host state machine of
//! [`state`]) and the coordinator [`link`] side by side until the host is
//! terminated or the shutdown token fires; either way everything the host
//! created is destroyed before `run` returns. [`sweep`] removes what killed
//! runs left behind.
//!
//! Boundaries: the binary (`main.rs`) only parses [`Config`], sets up tracing
//! and signals; Docker access goes through [`docker::DockerOps`], hosts come
//! from and end through [`Provider`], and the coordinator is only reached
//! through the link's channels, so each part is testable with fakes.

pub mod cleanup;
pub mod config;
pub mod docker;
pub mod dockerd;
pub mod driver;
pub mod front;
pub mod link;
pub mod netns;
pub mod provider;
pub mod state;
pub mod stats;
pub mod wipe;

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use cleanup::{CleanupReport, sweep};
pub use config::{Cli, Command, Config, LogFormat};
pub use provider::{Identity, Local, Provider};
pub use state::HostState;

use crate::docker::{BollardDocker, DaemonInfo};
use crate::dockerd::{DockerdSpec, HostPaths};
use crate::driver::{Driver, SystemClock};
use crate::front::DockerFront;
use crate::link::{Link, Registration};
use crate::state::{Event, Host};

/// The agent's version, as registered.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
/// How long the link may take to deliver the last messages (the final state
/// change, the wipe report) after the host is gone.
pub const LINK_FLUSH_TIMEOUT: Duration = Duration::from_secs(3);
/// Extra time the outer boot bound allows over `wait_ready`'s own, so that
/// a dockerd that never answers fails with its log tail, not a bare timeout.
const BOOT_TIMEOUT_SLACK: Duration = Duration::from_secs(1);
/// Capacity of the driver's inbox (coordinator messages, dockerd exit).
const INBOX_CAPACITY: usize = 64;

/// Why the agent stopped other than by a clean termination.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid configuration: {0}")]
    Config(#[from] config::ConfigError),
    #[error("learning the host's identity: {0}")]
    Identity(#[source] provider::ProviderError),
    #[error("booting the host: {0}")]
    Boot(#[from] dockerd::DockerdError),
    #[error("booting the host took longer than {0:?}")]
    BootTimeout(Duration),
    #[error(transparent)]
    Driver(#[from] driver::DriverError),
    #[error("destroying the host after a failed boot: {0}")]
    Teardown(#[source] provider::ProviderError),
}

/// Runs the agent until its host is terminated (drained, lease over, wipe
/// failed, dockerd died) or `shutdown` fires; in every case the host is
/// destroyed before this returns. `Ok(())` means the host ended cleanly.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), AgentError> {
    tracing::info!(?config, version = AGENT_VERSION, "berth-agent starting");
    config.validate()?;
    let started = Instant::now();
    let provider = Arc::new(Local::new(&config));
    let identity = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        r = provider.identity() => r.map_err(AgentError::Identity)?,
    };
    let span = tracing::info_span!("host", host_id = %identity.host_id);
    run_host(config, provider, identity, started, shutdown)
        .instrument(span)
        .await
}

async fn run_host<P: Provider>(
    config: Config,
    provider: Arc<P>,
    identity: Identity,
    started: Instant,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    // Network namespace and address, before dockerd starts.
    let identity_ms = started.elapsed().as_millis();
    let paths = HostPaths::new(&config.state_dir, &config.run_dir, &identity.host_id);
    let spec = DockerdSpec {
        program: config.dockerd.clone(),
        paths: paths.clone(),
        netns: identity.netns.clone(),
        cgroup_parent: cleanup::cgroup_name(&identity.host_id),
    };
    let booted = tokio::select! {
        _ = shutdown.cancelled() => None,
        // The outer bound also covers spawning; `wait_ready` gives the more
        // useful error (with dockerd's log tail) when it runs out first.
        r = tokio::time::timeout(config.boot_timeout + BOOT_TIMEOUT_SLACK, boot(&spec, config.boot_timeout)) => Some(match r {
            Err(_) => Err(AgentError::BootTimeout(config.boot_timeout)),
            Ok(r) => r,
        }),
    };
    let (child, docker, info) = match booted {
        Some(Ok(booted)) => booted,
        other => {
            // Shut down or failed while booting: the host never served
            // anyone; destroy it and report why.
            let teardown = provider.terminate().await;
            return match (other, teardown) {
                (Some(Err(e)), _) => Err(e),
                (_, Err(e)) => Err(AgentError::Teardown(e)),
                _ => Ok(()),
            };
        }
    };

    let front_addr = SocketAddr::new(identity.host_addr, config.front_port);
    let docker_host = format!("tcp://{front_addr}");
    let boot_ms = started.elapsed().as_millis();
    // The one line on stdout: `berth up` and the tests wait for it. A closed
    // stdout is no reason to fail.
    let _ = writeln!(
        std::io::stdout().lock(),
        "READY host_id={} host_addr={} docker_host={docker_host}",
        identity.host_id,
        identity.host_addr
    );
    let _ = std::io::stdout().flush();
    tracing::info!(
        host_addr = %identity.host_addr,
        %docker_host,
        docker_version = %info.server_version,
        storage_driver = %info.storage_driver,
        identity_ms,
        boot_ms,
        "host ready"
    );

    let (outbox_tx, outbox_rx) = mpsc::unbounded_channel();
    let (inbox_tx, inbox_rx) = mpsc::channel(INBOX_CAPACITY);
    let host = Host::booting(config.recycle);
    let (status_tx, status_rx) = watch::channel(driver::status_of(&host));
    // Booted goes first: it is what moves the machine to Ready.
    let _ = inbox_tx.try_send(Event::Booted);

    let watcher_tx = inbox_tx.clone();
    tokio::spawn(
        async move {
            let detail = dockerd::wait_exit(child).await;
            tracing::info!(%detail, "dockerd exited");
            let _ = watcher_tx.send(Event::DaemonExited { detail }).await;
        }
        .in_current_span(),
    );

    let registration = Registration {
        host_id: identity.host_id.clone(),
        host_addr: identity.host_addr,
        docker_host,
        provider: provider.name().to_owned(),
        instance_type: identity.instance_type.clone(),
        zone: identity.zone.clone(),
        agent_version: AGENT_VERSION.to_owned(),
        docker_version: info.server_version.clone(),
    };
    let sampler = stats::Sampler::new(&paths.data_root);
    let (link, _link_status) = Link::new(
        config.coordinator.clone(),
        registration,
        sampler,
        status_rx,
        outbox_rx,
        inbox_tx,
    );
    let link_stop = CancellationToken::new();
    let mut link_task = tokio::spawn(link.run(link_stop.clone()).in_current_span());

    let mut front = DockerFront::new(front_addr, identity.netns.clone(), paths.socket.clone());
    // The first lease's socket, made now so that accepting a lease only binds.
    front.prepare().await;
    let driver = Driver::new(
        host,
        Arc::new(docker),
        front,
        provider,
        SystemClock,
        outbox_tx,
        status_tx,
    );
    let result = driver.run(inbox_rx, shutdown).await;

    // The driver dropped its outbox: the link sends what is left and ends.
    if tokio::time::timeout(LINK_FLUSH_TIMEOUT, &mut link_task)
        .await
        .is_err()
    {
        link_stop.cancel();
        let _ = link_task.await;
    }
    let reason = result?;
    tracing::info!(%reason, "host terminated");
    Ok(())
}

/// Starts dockerd and waits until it answers and passes its self-check.
async fn boot(
    spec: &DockerdSpec,
    timeout: Duration,
) -> Result<(tokio::process::Child, BollardDocker, DaemonInfo), AgentError> {
    let mut child = spec.spawn().await?;
    let (docker, info) = dockerd::wait_ready(&mut child, &spec.paths, timeout).await?;
    Ok((child, docker, info))
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
