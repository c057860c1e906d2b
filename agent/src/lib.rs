//! `berth-agent`: turns one machine (locally: one network namespace) into a
//! single-use remote Docker host for CI.
//!
//! [`run`] is the whole agent: learn the host's identity through the
//! [`Provider`] ([`Local`], or [`ec2::Ec2Provider`] with `--provider ec2`),
//! start the host's own dockerd and self-check it (it must answer, and it
//! must listen on no TCP port: [`listeners`]), print the `READY` line, then
//! run the [`driver`] (the host state machine of [`state`]) and the
//! coordinator [`link`] side by side until the host is terminated or the
//! shutdown token fires; either way everything the host created is
//! destroyed before `run` returns. On EC2 a lifecycle poller feeds the
//! Auto Scaling target lifecycle in, so a warm-pool instance bootstraps but
//! registers only once in service. [`sweep`] removes what killed runs left
//! behind.
//!
//! Boundaries: the binary (`main.rs`) only parses [`Config`], sets up tracing
//! and signals; Docker access goes through [`docker::DockerOps`], hosts come
//! from and end through [`Provider`], and the coordinator is only reached
//! through the link's channels, so each part is testable with fakes.
//!
//! Credentials: the agent reaches the coordinator over TLS (trusting
//! `--ca`) with the pool join token (`--join-token-file`). It makes the
//! Docker front's key pair at start and sends only a CSR; the certificate
//! the coordinator signs (SAN = host address) comes back at registration.

pub mod config;
pub mod docker;
pub mod host;
pub mod link;
pub mod ops;
pub mod provider;

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_aws::TargetLifecycle;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use config::{Cli, Command, Config, LogFormat, ProviderKind};
pub use host::state::HostState;
pub use provider::cleanup::{CleanupReport, sweep};
pub use provider::{Identity, Local, Provider};

use crate::docker::client::{BollardDocker, DaemonInfo};
use crate::docker::dockerd::{self, DockerdSpec, HostPaths};
use crate::docker::front::{self, DockerFront};
use crate::docker::{health, listeners};
use crate::host::driver::{self, Driver, SystemClock};
use crate::host::state::{Event, Host};
use crate::host::statefile;
use crate::link::net as linknet;
use crate::link::{Credentials, Link, Registration};
use crate::ops::{stats, status};
use crate::provider::{cleanup, ec2, hostnet};

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
    #[error("taking over host {host_id}: {reason}")]
    Resume { host_id: String, reason: String },
    #[error("setting up the link through the host's network: {0}")]
    LinkNet(#[from] linknet::LinkNetError),
    #[error("{0} is required: the agent cannot reach the coordinator without it")]
    MissingCredential(&'static str),
    #[error("credentials: {0}")]
    Credentials(#[from] berth_tls::TlsError),
    #[error("reading the Auto Scaling lifecycle: {0}")]
    Lifecycle(#[source] provider::ProviderError),
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
        join_token: berth_tls::files::read_secret(token)?,
    })
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
            let boot = Boot {
                credentials,
                resumed,
                started,
            };
            Box::pin(start(config, provider, boot, shutdown)).await
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
            let boot = Boot {
                credentials,
                resumed: None,
                started,
            };
            Box::pin(start(config, provider, boot, shutdown)).await
        }
    }
}

/// What `run` hands on to the host: the credentials, the identity of a host
/// taken over (`--resume-host`), and when the agent started.
struct Boot {
    credentials: Credentials,
    resumed: Option<Identity>,
    started: Instant,
}

/// Learns the identity (and, where there is one, the lifecycle), then runs the host.
async fn start<P: Provider>(
    config: Config,
    provider: Arc<P>,
    boot: Boot,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let identity = match boot.resumed {
        Some(identity) => identity,
        None => tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = provider.identity() => r.map_err(AgentError::Identity)?,
        },
    };
    let span = tracing::info_span!("host", host_id = %identity.host_id);
    async {
        let relay_stop = CancellationToken::new();
        let _relay_guard = relay_stop.clone().drop_guard();
        let dialer = match (
            config.link_via_host_net,
            &identity.netns,
            provider.gateway(),
        ) {
            (true, Some(netns), Some(gateway)) => {
                // The relay listens on the gateway address: wired first.
                provider
                    .network_ready()
                    .await
                    .map_err(AgentError::Identity)?;
                let upstream = linknet::coordinator_addr(&config.coordinator).await?;
                let bind = SocketAddr::new(std::net::IpAddr::V4(gateway), 0);
                let relay = linknet::start_relay(bind, upstream, relay_stop).await?;
                tracing::info!(%relay, %upstream, "coordinator link goes through the host's network");
                Some(linknet::NetnsDialer {
                    netns: netns.clone(),
                    target: relay,
                })
            }
            _ => None,
        };
        // Read before dockerd starts: a warm-pool instance must not get as
        // far as registering because of a stale or missing answer.
        let lifecycle = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = provider.lifecycle() => r.map_err(AgentError::Lifecycle)?,
        };
        if let Some(l) = &lifecycle {
            tracing::info!(target_lifecycle = %l, "Auto Scaling target lifecycle");
        }
        let host = HostStart {
            credentials: boot.credentials,
            identity,
            dialer,
            lifecycle,
            started: boot.started,
        };
        run_host(config, provider, host, shutdown).await
    }
    .instrument(span)
    .await
}

/// Uses the dockerd a previous agent of this host started, if it still
/// runs and answers; a host without a working dockerd cannot be trusted.
async fn adopt(paths: &HostPaths) -> Result<(BollardDocker, DaemonInfo), AgentError> {
    let fail = |reason: String| AgentError::Resume {
        host_id: paths
            .host_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        reason,
    };
    if !dockerd::running(paths) {
        return Err(fail("its dockerd is not running".into()));
    }
    let docker = BollardDocker::new(&paths.socket).map_err(|e| fail(e.to_string()))?;
    docker
        .ping()
        .await
        .map_err(|e| fail(format!("its dockerd does not answer: {e}")))?;
    let docker = docker.negotiate().await.map_err(|e| fail(e.to_string()))?;
    let info = docker.info().await.map_err(|e| fail(e.to_string()))?;
    Ok((docker, info))
}

/// The driver event a lifecycle means, if any.
fn lifecycle_event(l: &TargetLifecycle) -> Option<Event> {
    match l {
        TargetLifecycle::Warmed(target) => Some(Event::Warmed {
            target: target.clone(),
        }),
        TargetLifecycle::InService | TargetLifecycle::NoGroup => Some(Event::InService),
        // Standby, Detached, ...: nothing berth acts on.
        TargetLifecycle::Other(_) => None,
    }
}

/// Reads the lifecycle every `every` and hands changes to the driver,
/// until `stop` fires or the driver is gone.
async fn poll_lifecycle<P: Provider>(
    provider: Arc<P>,
    mut last: TargetLifecycle,
    every: Duration,
    inbox: mpsc::Sender<Event>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match provider.lifecycle().await {
            Ok(Some(now)) if now != last => {
                tracing::info!(from = %last, to = %now, "Auto Scaling target lifecycle changed");
                if let Some(event) = lifecycle_event(&now)
                    && inbox.send(event).await.is_err()
                {
                    return;
                }
                last = now;
            }
            Ok(_) => {}
            // Transient: the next poll tries again; the state stays as it is.
            Err(e) => tracing::warn!(error = %e, "reading the Auto Scaling lifecycle failed"),
        }
    }
}

/// What `run_host` starts from.
struct HostStart {
    credentials: Credentials,
    identity: Identity,
    /// Dials the coordinator through the host's own network, when set.
    dialer: Option<linknet::NetnsDialer>,
    lifecycle: Option<TargetLifecycle>,
    started: Instant,
}

async fn run_host<P: Provider>(
    config: Config,
    provider: Arc<P>,
    host_start: HostStart,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let HostStart {
        credentials,
        identity,
        dialer,
        lifecycle,
        started,
    } = host_start;
    let resuming = config.resume_host.is_some();
    // Network namespace and address, before dockerd starts.
    let identity_ms = started.elapsed().as_millis();
    let paths = HostPaths::new(&config.state_dir, &config.run_dir, &identity.local_id);
    let spec = DockerdSpec {
        program: config.dockerd.clone(),
        paths: paths.clone(),
        netns: identity.netns.clone(),
        cgroup_parent: cleanup::cgroup_name(&identity.local_id),
        network: identity.network,
    };
    let booted = tokio::select! {
        _ = shutdown.cancelled() => None,
        // The outer bound also covers spawning; `wait_ready` gives the more
        // useful error (with dockerd's log tail) when it runs out first.
        r = tokio::time::timeout(config.boot_timeout + BOOT_TIMEOUT_SLACK, async {
            let booted = if resuming {
                adopt(&spec.paths).await.map(|(d, i)| (None, d, i))
            } else {
                boot(&spec, config.boot_timeout).await.map(|(c, d, i)| (Some(c), d, i))
            }?;
            // The namespace was wired while dockerd started.
            provider.network_ready().await.map_err(AgentError::Identity)?;
            // dockerd made its chains; the host's own rules go in after them.
            hostnet::apply(spec.network, spec.netns.as_deref())
                .await
                .map_err(dockerd::DockerdError::from)?;
            Ok(booted)
        }) => Some(match r {
            Err(_) => Err(AgentError::BootTimeout(config.boot_timeout)),
            Ok(r) => r,
        }),
    };
    let (child, docker, info) = match booted {
        Some(Ok(booted)) => booted,
        other => {
            // Shut down or failed while booting: the host never served
            // anyone; destroy it and report why. A shutdown of a machine
            // that outlives its agent (an EC2 instance being stopped into
            // the warm pool) leaves the machine alone.
            let teardown = if other.is_none() && provider.machine_outlives_agent() {
                provider.stop().await
            } else {
                provider.terminate().await
            };
            return match (other, teardown) {
                (Some(Err(e)), _) => Err(e),
                (_, Err(e)) => Err(AgentError::Teardown(e)),
                _ => Ok(()),
            };
        }
    };

    let front_addr = SocketAddr::new(identity.host_addr, config.front_port);
    let docker_host = format!("tcp://{front_addr}");
    // Bound before the host is announced, so the status endpoint answers
    // as soon as anyone learns of the host; served once its board exists.
    let status_listener = match config.status_listen.resolve(identity.host_addr) {
        Some(addr) => match front::bind_in_netns(addr, identity.netns.clone()).await {
            Ok(l) => Some((addr, l)),
            Err(e) => {
                // The host still serves builds; only its status page is missing.
                tracing::error!(%addr, error = %e, "status endpoint: cannot listen");
                None
            }
        },
        None => None,
    };
    let status_url = status_listener
        .as_ref()
        .map(|(a, _)| format!(" status=http://{a}"))
        .unwrap_or_default();
    let boot_ms = started.elapsed().as_millis();
    // The one line on stdout: `berth up` and the tests wait for it. A closed
    // stdout is no reason to fail.
    let _ = writeln!(
        std::io::stdout().lock(),
        "READY host_id={} host_addr={} docker_host={docker_host}{status_url}",
        identity.host_id,
        identity.host_addr
    );
    let _ = std::io::stdout().flush();
    berth_runtime::systemd::ready(&format!(
        "host {} ready at {}",
        identity.host_id, identity.host_addr
    ));
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
    // The driver's messages pass the status board on their way to the link.
    let (driver_out_tx, driver_out_rx) = mpsc::unbounded_channel();
    let (inbox_tx, inbox_rx) = mpsc::channel(INBOX_CAPACITY);
    // dockerd's failures pass the status board on their way to the driver.
    let (daemon_tx, daemon_rx) = mpsc::channel(INBOX_CAPACITY);
    let host = Host::booting(config.recycle).keeping_on_shutdown(provider.machine_outlives_agent());
    let (status_tx, status_rx) = watch::channel(driver::status_of(&host));
    let state_file = statefile::path(&paths.host_dir);
    let first = if resuming {
        let saved = match statefile::read(&state_file) {
            Ok(saved) => saved,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable state file; the host's state is unknown");
                None
            }
        };
        tracing::info!(?saved, "taking over a host that outlived its agent");
        let boot = statefile::boot_id();
        if saved.as_ref().is_some_and(|s| s.from_earlier_boot(boot)) {
            tracing::warn!(
                boot_id = boot,
                "the state file was written before the machine rebooted; the host is terminated"
            );
        }
        statefile::Saved::resumed(saved.as_ref(), std::time::SystemTime::now(), boot)
    } else {
        Event::Booted
    };
    // Where Auto Scaling takes the instance goes first, then Booted (or
    // Resumed), which moves the machine on to Ready (or Warming).
    let poller_stop = CancellationToken::new();
    if let Some(l) = lifecycle {
        if l.is_warmed() {
            tracing::info!(target_lifecycle = %l, "warm pool: bootstrapped; not registering until InService");
        }
        if let Some(event) = lifecycle_event(&l) {
            let _ = inbox_tx.try_send(event);
        }
        tokio::spawn(
            poll_lifecycle(
                provider.clone(),
                l,
                config.lifecycle_poll,
                inbox_tx.clone(),
                poller_stop.clone(),
            )
            .in_current_span(),
        );
    }
    let _ = inbox_tx.try_send(first);

    if let Some(child) = child {
        let watcher_tx = daemon_tx.clone();
        tokio::spawn(
            async move {
                let detail = dockerd::wait_exit(child).await;
                tracing::info!(%detail, "dockerd exited");
                let _ = watcher_tx.send(Event::DaemonExited { detail }).await;
            }
            .in_current_span(),
        );
    }
    let health_stop = CancellationToken::new();
    let _health_guard = health_stop.clone().drop_guard();
    let probe = health::DaemonProbe {
        docker: docker.clone(),
        pidfile: paths.pidfile.clone(),
    };
    tokio::spawn(health::watch(probe.clone(), daemon_tx, health_stop).in_current_span());

    // The front's key is made here and never leaves the host; the
    // coordinator signs its CSR at registration.
    let front_key = match berth_tls::KeyAndCsr::generate(&identity.host_id) {
        Ok(k) => k,
        Err(e) => {
            let _ = provider.terminate().await;
            return Err(e.into());
        }
    };
    let host_info = status::HostInfo {
        host_id: identity.host_id.clone(),
        host_addr: identity.host_addr.to_string(),
        docker_host: docker_host.clone(),
        provider: provider.name().to_owned(),
        instance_type: identity.instance_type.clone(),
        zone: identity.zone.clone(),
        agent_version: AGENT_VERSION.to_owned(),
        docker_version: info.server_version.clone(),
        coordinator: config.coordinator.clone(),
    };
    let board_status_rx = status_rx.clone();
    let registration = Registration {
        host_id: identity.host_id.clone(),
        host_addr: identity.host_addr,
        docker_host,
        provider: provider.name().to_owned(),
        instance_type: identity.instance_type.clone(),
        zone: identity.zone.clone(),
        agent_version: AGENT_VERSION.to_owned(),
        docker_version: info.server_version.clone(),
        csr_pem: front_key.csr_pem.clone(),
    };
    let sampler = stats::Sampler::new(&paths.data_root);
    let isolation_tx = inbox_tx.clone();
    let daemon_to_driver = inbox_tx.clone();
    let (link, link_status) = Link::new(
        config.coordinator.clone(),
        credentials,
        registration,
        sampler,
        status_rx,
        outbox_rx,
        inbox_tx,
    );
    let link = match dialer {
        Some(d) => link.dial_through(d),
        None => link,
    };
    tokio::spawn(
        watch_isolation(link_status.clone(), config.isolation_limit, isolation_tx)
            .in_current_span(),
    );
    let link_stop = CancellationToken::new();
    let board = status::Board::new(
        host_info,
        started,
        board_status_rx,
        link_status.clone(),
        stats::Sampler::new(&paths.data_root),
        probe,
    );
    let status_stop = CancellationToken::new();
    let _status_guard = status_stop.clone().drop_guard();
    tokio::spawn(board.clone().follow(status_stop.clone()).in_current_span());
    tokio::spawn(status::tap_outbox(board.clone(), driver_out_rx, outbox_tx).in_current_span());
    tokio::spawn(
        status::tap_daemon_events(board.clone(), daemon_rx, daemon_to_driver).in_current_span(),
    );
    if let Some((addr, listener)) = status_listener {
        tracing::info!(%addr, "status endpoint listening (/healthz /readyz /status /metrics)");
        tokio::spawn(
            status::serve(listener, status::router(board), status_stop.clone()).in_current_span(),
        );
    }
    let mut link_task = tokio::spawn(link.run(link_stop.clone()).in_current_span());

    let mut front = DockerFront::new(
        front_addr,
        identity.netns.clone(),
        paths.socket.clone(),
        front_key.key_pem,
        link_status,
    );
    // The first lease's socket, made now so that accepting a lease only binds.
    front.prepare().await;
    let driver = Driver::new(
        host,
        Arc::new(docker),
        front,
        provider,
        SystemClock,
        driver_out_tx,
        status_tx,
    )
    .with_state_file(&identity.host_id, state_file);
    let result = driver.run(inbox_rx, shutdown).await;
    poller_stop.cancel();

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

/// Tells the driver, every `limit`, while the link stays down. Ends when the
/// link or the driver is gone.
async fn watch_isolation(
    mut link: watch::Receiver<link::LinkStatus>,
    limit: Duration,
    to_driver: mpsc::Sender<Event>,
) {
    // The link republishes its status on every failed attempt; the clock
    // runs from the first moment it was down, not from the latest attempt.
    let mut down_since: Option<tokio::time::Instant> = None;
    let mut last_told: Option<tokio::time::Instant> = None;
    loop {
        if link.borrow_and_update().connected {
            down_since = None;
            last_told = None;
            if link.changed().await.is_err() {
                return;
            }
            continue;
        }
        let since = *down_since.get_or_insert_with(tokio::time::Instant::now);
        let due = last_told.unwrap_or(since) + limit;
        tokio::select! {
            r = link.changed() => if r.is_err() { return },
            _ = tokio::time::sleep_until(due) => {
                let for_ = since.elapsed();
                tracing::warn!(?for_, "coordinator unreachable past the isolation limit");
                last_told = Some(tokio::time::Instant::now());
                if to_driver.send(Event::Isolated { for_ }).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Starts dockerd and waits until it answers and passes its self-check.
async fn boot(
    spec: &DockerdSpec,
    timeout: Duration,
) -> Result<(tokio::process::Child, BollardDocker, DaemonInfo), AgentError> {
    let mut child = spec.spawn().await?;
    let (docker, info) = dockerd::wait_ready(&mut child, &spec.paths, timeout).await?;
    // dockerd opens every `-H` listener before it answers /_ping, so a TCP
    // listener, if any, is there by now.
    let pid = dockerd::read_pid(&spec.paths.pidfile)
        .or_else(|| child.id().and_then(|p| i32::try_from(p).ok()))
        .ok_or_else(|| dockerd::DockerdError::NoPid(spec.paths.pidfile.clone()))?;
    listeners::ensure_no_tcp(pid).map_err(dockerd::DockerdError::from)?;
    tracing::info!(pid, "dockerd listens on no TCP port");
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
