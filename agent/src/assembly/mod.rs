//! The agent's assembly: how one host's parts are put together, run and
//! taken apart. [`start`] learns the host's identity and hands over to
//! [`run_host`], which goes through the host's life in steps:
//!
//! 1. route: on a local host with `--link-via-host-net`, the relay that
//!    carries the coordinator link through the host's own network;
//! 2. lifecycle: where Auto Scaling takes the instance (EC2), read before
//!    dockerd starts;
//! 3. boot: the [`Daemon`] boots (or, for `--resume-host`, adopts) the host's
//!    dockerd; a boot that fails or is shut down destroys the host;
//! 4. announce: the status endpoint is bound and the `READY` line printed;
//! 5. wire and run: the driver, the coordinator link, the status board and
//!    the watchers (dockerd exit and health, lifecycle, isolation) are
//!    connected and run until the driver has ended the host;
//! 6. drain: the link gets [`LINK_FLUSH_TIMEOUT`] to deliver the last
//!    messages, then every task is stopped and joined; the `ENDED` line
//!    says how many leases the host served (`berth up` replaces a host that
//!    served its lease at once, and backs off only for hosts that did not).
//!
//! Tasks: one root [`CancellationToken`], a child of it per task, and one
//! [`TaskTracker`] that every task is spawned on (`Tasks`); `run_host`
//! returns only once the tracker is empty, so nothing of the host is still
//! running after it (a task that ignores its token for longer than
//! [`TASKS_JOIN_TIMEOUT`] is logged and left to the process exit). The driver itself runs in `run_host`'s own future: it
//! ends the host, everything else serves it. The `shutdown` token (signals)
//! goes to the driver only, which turns it into the host's last transitions;
//! the link must still carry those, so it is not a parent of the root.
//!
//! Message paths are direct: driver -> link (mpsc), link -> driver and
//! dockerd's watchers -> driver (the inbox). The status board only reads
//! `watch`es published at their sources and is never in those paths.
//!
//! Boundaries: dockerd is reached through [`Daemon`], the machine through
//! [`Provider`], the coordinator through the [`Link`]; the unit tests wire
//! fakes of all three.

pub mod watchers;

#[cfg(test)]
mod tests;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_aws::TargetLifecycle;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::Config;
use crate::docker::daemon::{Daemon, Dockerd, Running};
use crate::docker::dockerd::{DockerdSpec, HostPaths};
use crate::docker::front::{self, DockerFront};
use crate::docker::health::{self, FailureReporter};
use crate::docker::reset::OldRoot;
use crate::host::driver::{self, Driver, SystemClock};
use crate::host::state::{Event, Host};
use crate::host::statefile;
use crate::link::net as linknet;
use crate::link::{Credentials, Link, Registration};
use crate::ops::{stats, status};
use crate::provider::{Identity, Provider, cleanup};
use crate::{AGENT_VERSION, AgentError};

/// How long the link may take to deliver the last messages (the final state
/// change, the wipe report) after the host is gone.
pub const LINK_FLUSH_TIMEOUT: Duration = Duration::from_secs(3);
/// Extra time the outer boot bound allows over `wait_ready`'s own, so that
/// a dockerd that never answers fails with its log tail, not a bare timeout.
const BOOT_TIMEOUT_SLACK: Duration = Duration::from_secs(1);
/// Bound on waiting for the host's tasks once they are told to stop. Each
/// only has to notice its token, but the status endpoint lets a request in
/// progress finish, and a client that stalls mid-request must not keep the
/// agent of a destroyed host from exiting.
pub const TASKS_JOIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Capacity of the driver's inbox (coordinator messages, dockerd failures,
/// lifecycle and isolation events).
const INBOX_CAPACITY: usize = 64;

/// What `run` hands on to the host: the credentials, the identity of a host
/// taken over (`--resume-host`), and when the agent started.
#[derive(Debug)]
pub struct Boot {
    pub credentials: Credentials,
    pub resumed: Option<Identity>,
    pub started: Instant,
    /// The mirrors and pool registries the host's dockerd is configured with.
    pub registries: crate::docker::registries::Registries,
}

/// Learns the identity (unless the host is taken over), then runs the host
/// with its real dockerd.
pub async fn start<P: Provider>(
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
    let daemon = Dockerd::new(
        DockerdSpec {
            program: config.dockerd.clone(),
            paths: HostPaths::new(&config.state_dir, &config.run_dir, &identity.local_id),
            netns: identity.netns.clone(),
            cgroup_parent: cleanup::cgroup_name(&identity.local_id),
            network: identity.network,
            dns: identity.dns(),
            registries: boot.registries,
        },
        config.boot_timeout,
    )
    .with_old_root(if config.recycle {
        OldRoot::DeleteInBackground
    } else {
        OldRoot::LeaveToTeardown
    });
    let host = HostStart {
        credentials: boot.credentials,
        identity,
        started: boot.started,
    };
    run_host(config, provider, daemon, host, shutdown)
        .instrument(span)
        .await
}

/// What [`run_host`] starts from.
#[derive(Debug)]
pub struct HostStart {
    pub credentials: Credentials,
    pub identity: Identity,
    pub started: Instant,
}

/// The host's tasks: one root token with a child token per task, and one
/// tracker they are all spawned on. Dropping it cancels the root (tasks are
/// told to stop even on an early return); [`Tasks::join`] also waits until
/// every task has ended.
struct Tasks {
    root: CancellationToken,
    tracker: TaskTracker,
}

impl Tasks {
    fn new() -> Self {
        Tasks {
            root: CancellationToken::new(),
            tracker: TaskTracker::new(),
        }
    }

    /// A child of the root, for a task spawned some other way (the relay).
    fn token(&self) -> CancellationToken {
        self.root.child_token()
    }

    /// Spawns `task`, given its own child token, in the current span;
    /// returns that token (to stop this task alone) and its handle.
    fn spawn<F>(
        &self,
        task: impl FnOnce(CancellationToken) -> F,
    ) -> (CancellationToken, JoinHandle<()>)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let stop = self.token();
        let handle = self.tracker.spawn(task(stop.clone()).in_current_span());
        (stop, handle)
    }

    /// Stops every task and waits until all have ended (at most
    /// [`TASKS_JOIN_TIMEOUT`]; what is left then goes with the process).
    async fn join(&self) {
        self.root.cancel();
        self.tracker.close();
        if tokio::time::timeout(TASKS_JOIN_TIMEOUT, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = self.tracker.len(),
                "host tasks still running {TASKS_JOIN_TIMEOUT:?} after they were told to stop"
            );
        }
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.root.cancel();
    }
}

/// Runs one host from boot to its end (see the module notes); every task it
/// started has ended when it returns.
pub async fn run_host<P: Provider, D: Daemon>(
    config: Config,
    provider: Arc<P>,
    daemon: D,
    host: HostStart,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let tasks = Tasks::new();
    let result = run_host_on(&tasks, config, provider, daemon, host, shutdown).await;
    tasks.join().await;
    result
}

async fn run_host_on<P: Provider, D: Daemon>(
    tasks: &Tasks,
    config: Config,
    provider: Arc<P>,
    daemon: D,
    host: HostStart,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let HostStart {
        credentials,
        identity,
        started,
    } = host;
    let dialer = route(tasks, &config, &*provider, &identity).await?;
    // Read before dockerd starts: a warm-pool instance must not get as
    // far as registering because of a stale or missing answer.
    let lifecycle = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        r = provider.lifecycle() => r.map_err(AgentError::Lifecycle)?,
    };
    if let Some(l) = &lifecycle {
        tracing::info!(target_lifecycle = %l, "Auto Scaling target lifecycle");
    }
    // Network namespace and address, before dockerd starts.
    let identity_ms = started.elapsed().as_millis();
    let paths = HostPaths::new(&config.state_dir, &config.run_dir, &identity.local_id);
    // A host that has a past is never Ready: judged before dockerd starts
    // (the state file) and once it answers (what its data root holds).
    let check_holdings = match past(&config, &paths) {
        Past::Taken => false,
        Past::Fresh { data_root_existed } => data_root_existed,
        Past::Burned(why) => return burn(&*provider, &identity, why).await,
    };
    let Some(running) = boot(&config, &*provider, &daemon, &shutdown).await? else {
        return Ok(());
    };
    if check_holdings {
        let held = match crate::docker::wipe::holdings(&running.docker).await {
            Ok(h) => h,
            Err(source) => {
                let _ = provider.terminate().await;
                return Err(AgentError::Holdings {
                    host_id: identity.host_id.clone(),
                    source,
                });
            }
        };
        if !held.is_zero() {
            let why = format!(
                "its data root holds {} containers, {} images, {} volumes and {} networks of a past nobody vouches for",
                held.containers, held.images, held.volumes, held.networks
            );
            drop(running);
            return burn(&*provider, &identity, why).await;
        }
    }
    let front_addr = SocketAddr::new(identity.host_addr, config.front_port);
    let docker_host = format!("tcp://{front_addr}");
    let status_listener = announce(&config, &identity, &docker_host).await;
    tracing::info!(
        host_addr = %identity.host_addr,
        %docker_host,
        docker_version = %running.info.server_version,
        storage_driver = %running.info.storage_driver,
        identity_ms,
        boot_ms = started.elapsed().as_millis(),
        "host ready"
    );
    // The host's key: made once, kept in the host's directory for the
    // host's life, never sent anywhere. The coordinator signs its CSR at
    // registration (the front's server certificate) and binds the host id
    // to it: a successor agent (`--resume-host`) proves it is this host
    // with the same key.
    let front_key = match host_key(&paths.host_dir, &identity.host_id) {
        Ok(k) => k,
        Err(e) => {
            let _ = provider.terminate().await;
            return Err(e.into());
        }
    };
    let parts: Parts<P, D> = Parts {
        config,
        provider,
        running,
        credentials,
        identity,
        dialer,
        lifecycle,
        started,
        front_addr,
        docker_host,
        front_key,
        status_listener,
    };
    wire_and_run(tasks, parts, shutdown).await
}

/// File of the host's key inside its directory.
pub const HOST_KEY_FILE: &str = "host-key.pem";

/// The host's key pair (and a CSR for it): the one in the host's
/// directory, or a new one written there (0600).
fn host_key(
    host_dir: &std::path::Path,
    host_id: &str,
) -> Result<berth_tls::KeyAndCsr, berth_tls::TlsError> {
    let path = host_dir.join(HOST_KEY_FILE);
    match berth_tls::files::read_pem(&path) {
        Ok(pem) => berth_tls::KeyAndCsr::for_key(&pem, host_id),
        Err(_) => {
            let k = berth_tls::KeyAndCsr::generate(host_id)?;
            std::fs::create_dir_all(host_dir).map_err(|source| berth_tls::TlsError::Io {
                action: "cannot create",
                path: host_dir.to_owned(),
                source,
            })?;
            berth_tls::files::write_private(&path, k.key_pem.as_bytes())?;
            Ok(k)
        }
    }
}

/// What an agent starting on a host directory finds there.
enum Past {
    /// `--resume-host`: the host is taken over with its lease (the state
    /// machine decides from the state file).
    Taken,
    /// No record of a lease; `data_root_existed` says whether dockerd's data
    /// root must be looked at once dockerd answers.
    Fresh { data_root_existed: bool },
    /// The host held a lease or cannot be trusted.
    Burned(String),
}

fn past(config: &Config, paths: &HostPaths) -> Past {
    if config.resume_host.is_some() {
        return Past::Taken;
    }
    match statefile::history(&paths.host_dir, statefile::boot_id()) {
        statefile::History::Burned(why) => Past::Burned(why),
        statefile::History::None | statefile::History::NeverLeased => Past::Fresh {
            data_root_existed: paths.data_root.exists(),
        },
    }
}

/// Ends a host that has a past, before it is ever Ready.
async fn burn<P: Provider>(
    provider: &P,
    identity: &Identity,
    why: String,
) -> Result<(), AgentError> {
    tracing::error!(
        host_id = %identity.host_id,
        reason = %why,
        "this host is not fresh; terminating it instead of offering it"
    );
    if let Err(e) = provider.terminate().await {
        tracing::error!(error = %e, "terminating the host failed");
    }
    Err(AgentError::Burned {
        host_id: identity.host_id.clone(),
        why,
    })
}

/// Step 1: the relay that carries the link through the host's own network,
/// when configured and the host has one; the link then dials through it.
async fn route<P: Provider>(
    tasks: &Tasks,
    config: &Config,
    provider: &P,
    identity: &Identity,
) -> Result<Option<linknet::NetnsDialer>, AgentError> {
    let (true, Some(netns), Some(gateway)) = (
        config.link_via_host_net,
        &identity.netns,
        provider.gateway(),
    ) else {
        return Ok(None);
    };
    // The relay listens on the gateway address: wired first.
    provider
        .network_ready()
        .await
        .map_err(AgentError::Identity)?;
    // The relay forwards to one coordinator: the first of the list.
    let first = crate::link::coordinator_urls(&config.coordinator)
        .into_iter()
        .next()
        .unwrap_or_default();
    let upstream = linknet::coordinator_addr(&first).await?;
    let bind = SocketAddr::new(std::net::IpAddr::V4(gateway), 0);
    let relay = linknet::start_relay(bind, upstream, tasks.token(), &tasks.tracker).await?;
    tracing::info!(%relay, %upstream, "coordinator link goes through the host's network");
    Ok(Some(linknet::NetnsDialer {
        netns: netns.clone(),
        target: relay,
    }))
}

/// Step 3: boots (or adopts) dockerd and waits for the host's network.
/// `None` when shut down meanwhile; either that or a failure destroys the
/// host, which never served anyone.
async fn boot<P: Provider, D: Daemon>(
    config: &Config,
    provider: &P,
    daemon: &D,
    shutdown: &CancellationToken,
) -> Result<Option<Running<D::Docker, D::Probe>>, AgentError> {
    let resuming = config.resume_host.is_some();
    let booted = tokio::select! {
        _ = shutdown.cancelled() => None,
        // The outer bound also covers spawning; `wait_ready` gives the more
        // useful error (with dockerd's log tail) when it runs out first.
        // The namespace is wired while dockerd starts.
        r = tokio::time::timeout(config.boot_timeout + BOOT_TIMEOUT_SLACK, async {
            let (running, ()) = tokio::try_join!(
                async {
                    if resuming { daemon.adopt().await } else { daemon.boot().await }
                        .map_err(AgentError::from)
                },
                async { provider.network_ready().await.map_err(AgentError::Identity) },
            )?;
            Ok(running)
        }) => Some(match r {
            Err(_) => Err(AgentError::BootTimeout(config.boot_timeout)),
            Ok(r) => r,
        }),
    };
    if let Some(Ok(running)) = booted {
        return Ok(Some(running));
    }
    // A shutdown of a machine that outlives its agent (an EC2 instance
    // being stopped into the warm pool) leaves the machine alone.
    let teardown = if booted.is_none() && provider.machine_outlives_agent() {
        provider.stop().await
    } else {
        provider.terminate().await
    };
    match (booted, teardown) {
        (Some(Err(e)), _) => Err(e),
        (_, Err(e)) => Err(AgentError::Teardown(e)),
        _ => Ok(None),
    }
}

/// Step 4: binds the status endpoint (before the host is announced, so it
/// answers as soon as anyone learns of the host) and prints the `READY`
/// line; returns the endpoint's listener, if it has one.
async fn announce(
    config: &Config,
    identity: &Identity,
    docker_host: &str,
) -> Option<(SocketAddr, std::net::TcpListener)> {
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
    // `berth up` and the tests wait for this line (the only other line on
    // stdout is `ENDED`, see [`announce_end`]). A closed stdout is no reason
    // to fail.
    let _ = writeln!(
        std::io::stdout().lock(),
        "{}host_id={} host_addr={} docker_host={docker_host}{status_url}",
        berth_proto::supervisor::READY_PREFIX,
        identity.host_id,
        identity.host_addr
    );
    let _ = std::io::stdout().flush();
    berth_runtime::systemd::ready(&format!(
        "host {} ready at {}",
        identity.host_id, identity.host_addr
    ));
    status_listener
}

/// Everything step 5 wires together.
struct Parts<P, D: Daemon> {
    config: Config,
    provider: Arc<P>,
    running: Running<D::Docker, D::Probe>,
    credentials: Credentials,
    identity: Identity,
    dialer: Option<linknet::NetnsDialer>,
    lifecycle: Option<TargetLifecycle>,
    started: Instant,
    front_addr: SocketAddr,
    docker_host: String,
    front_key: berth_tls::KeyAndCsr,
    status_listener: Option<(SocketAddr, std::net::TcpListener)>,
}

/// The driver's first events: where Auto Scaling takes the instance, then
/// `Booted` (or `Resumed`, for a host taken over), which moves the machine
/// on to Ready (or Warming).
fn first_events(
    config: &Config,
    paths: &HostPaths,
    lifecycle: Option<&TargetLifecycle>,
) -> Vec<Event> {
    let mut events = Vec::new();
    if let Some(l) = lifecycle {
        if l.is_warmed() {
            tracing::info!(target_lifecycle = %l, "warm pool: bootstrapped; not registering until InService");
        }
        events.extend(watchers::lifecycle_event(l));
    }
    if config.resume_host.is_none() {
        events.push(Event::Booted);
        return events;
    }
    let saved = match statefile::read(&statefile::path(&paths.host_dir)) {
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
    events.push(statefile::Saved::resumed(
        saved.as_ref(),
        std::time::SystemTime::now(),
        boot,
    ));
    events
}

/// Steps 5 and 6: wires the parts, runs the driver until it has ended the
/// host, then gives the link its time to deliver the last messages.
async fn wire_and_run<P: Provider, D: Daemon>(
    tasks: &Tasks,
    parts: Parts<P, D>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let Parts {
        config,
        provider,
        running,
        credentials,
        identity,
        dialer,
        lifecycle,
        started,
        front_addr,
        docker_host,
        front_key,
        status_listener,
    } = parts;
    let paths = HostPaths::new(&config.state_dir, &config.run_dir, &identity.local_id);

    // The message paths: driver -> link, and everything -> the driver's inbox.
    let (outbox_tx, outbox_rx) = mpsc::unbounded_channel();
    // Where machines can be taken back (EC2), notices go to the link too.
    let notice_tx = lifecycle.is_some().then(|| outbox_tx.clone());
    let (inbox_tx, inbox_rx) = mpsc::channel(INBOX_CAPACITY);
    for event in first_events(&config, &paths, lifecycle.as_ref()) {
        let _ = inbox_tx.try_send(event);
    }
    let host = Host::booting(config.recycle).keeping_on_shutdown(provider.machine_outlives_agent());
    let (status_tx, status_rx) = watch::channel(driver::status_of(&host));
    let (daemon_failures, daemon_health) = FailureReporter::new(inbox_tx.clone());

    let registration = Registration {
        host_id: identity.host_id.clone(),
        host_addr: identity.host_addr,
        docker_host: docker_host.clone(),
        provider: provider.name().to_owned(),
        instance_type: identity.instance_type.clone(),
        zone: identity.zone.clone(),
        agent_version: AGENT_VERSION.to_owned(),
        docker_version: running.info.server_version.clone(),
        csr_pem: front_key.csr_pem.clone(),
    };
    let (link, link_status) = Link::new(
        config.coordinator.clone(),
        credentials,
        registration,
        stats::Sampler::new(&paths.data_root),
        status_rx.clone(),
        outbox_rx,
        inbox_tx.clone(),
    );
    let link = match dialer {
        Some(d) => link.dial_through(d),
        None => link,
    };
    let mut front = DockerFront::new(
        front_addr,
        identity.netns.clone(),
        paths.socket.clone(),
        front_key.key_pem,
        link_status.clone(),
    )
    .reporting_use_to(inbox_tx.clone());
    // The first lease's socket, made now so that accepting a lease only binds.
    front.prepare().await;
    let Running {
        docker,
        probe,
        info,
        exited,
        wipe,
    } = running;
    let driver = Driver::new(
        host,
        Arc::new(docker),
        front,
        provider.clone(),
        SystemClock,
        outbox_tx,
        status_tx,
    )
    .with_state_file(&identity.host_id, statefile::path(&paths.host_dir))
    .with_wipe_path(wipe);

    let board = status::Board::new(
        status::HostInfo {
            host_id: identity.host_id.clone(),
            host_addr: identity.host_addr.to_string(),
            docker_host,
            provider: provider.name().to_owned(),
            instance_type: identity.instance_type.clone(),
            zone: identity.zone.clone(),
            agent_version: AGENT_VERSION.to_owned(),
            docker_version: info.server_version.clone(),
            coordinator: config.coordinator.clone(),
        },
        started,
        status::Sources {
            host: status_rx,
            link: link_status.clone(),
            daemon: daemon_health,
            wipes: driver.wipes(),
        },
        stats::Sampler::new(&paths.data_root),
        probe.clone(),
    );

    // The tasks that serve the driver.
    let poller = lifecycle.map(|l| {
        let (provider, inbox) = (provider.clone(), inbox_tx.clone());
        let every = config.lifecycle_poll;
        tasks
            .spawn(|stop| watchers::poll_lifecycle(provider, l, every, inbox, stop))
            .0
    });
    // A notice that the machine is taken back drains the host.
    let notice_watch = notice_tx.map(|outbox| {
        let (provider, inbox) = (provider.clone(), inbox_tx.clone());
        let every = config.lifecycle_poll;
        tasks
            .spawn(|stop| watchers::watch_interruption(provider, every, inbox, outbox, stop))
            .0
    });
    if let Some(exited) = exited {
        let failures = daemon_failures.clone();
        tasks.spawn(|stop| health::watch_exit(exited, failures, stop));
    }
    tasks.spawn(|stop| health::watch(probe, daemon_failures, stop));
    let limit = config.isolation_limit;
    let to_driver = inbox_tx.clone();
    let link_watch = link_status.clone();
    tasks.spawn(|stop| watchers::watch_isolation(link_watch, limit, to_driver, stop));
    // Only the tasks above send to the driver from now on (and the link).
    drop(inbox_tx);
    tasks.spawn(|stop| board.clone().follow(stop));
    if let Some((addr, listener)) = status_listener {
        tracing::info!(%addr, "status endpoint listening (/healthz /readyz /status /metrics)");
        let router = status::router(board);
        tasks.spawn(|stop| status::serve(listener, router, stop));
    }
    let (link_stop, mut link_task) = tasks.spawn(|stop| link.run(stop));

    let wipes = driver.wipes();
    let result = driver.run(inbox_rx, shutdown).await;
    if let Some(watch) = notice_watch {
        watch.cancel();
    }
    if let Some(poller) = poller {
        poller.cancel();
    }
    // The driver dropped its outbox: the link sends what is left and ends.
    if tokio::time::timeout(LINK_FLUSH_TIMEOUT, &mut link_task)
        .await
        .is_err()
    {
        link_stop.cancel();
        let _ = link_task.await;
    }
    let reason = result?;
    let served = wipes.borrow().total();
    tracing::info!(%reason, leases_served = served, "host terminated");
    announce_end(&identity.host_id, served, &reason);
    Ok(())
}

/// Prints the `ENDED` line once the host is destroyed: how many leases it
/// served (each ends with a wipe report) and why it ended. `berth up`
/// reads it to tell a single-use host that served its build (replaced at
/// once) from one that ended without serving (a crash loop is backed off).
fn announce_end(host_id: &str, leases_served: u64, reason: &str) {
    let _ = writeln!(
        std::io::stdout().lock(),
        "{}",
        berth_proto::supervisor::ended_line(host_id, leases_served, reason)
    );
    let _ = std::io::stdout().flush();
}
