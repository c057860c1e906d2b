//! The seam between the host's assembly and its dockerd. A [`Daemon`]
//! either boots a fresh dockerd or adopts the one a previous agent of the
//! same host left running, and hands back what the rest of the agent works
//! with ([`Running`]): the Docker API for the wipe, a health [`Probe`], the
//! daemon's own description for registration, and, for a daemon that is the
//! agent's child, a future that resolves when it exits.
//!
//! [`Dockerd`] is the real one, over [`dockerd`] (spawn, wait for `/_ping`,
//! self-check, refuse any TCP listener). The assembly's tests use a fake.
//! Stopping a daemon is not this seam's business: the provider ends the
//! host, dockerd with it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::docker::client::{BollardDocker, DaemonInfo, DockerOps};
use crate::docker::dockerd::{self, DockerdError, DockerdSpec, HostPaths};
use crate::docker::health::{DaemonProbe, Probe};
use crate::docker::reset::{OldRoot, Replacer};
use crate::provider::hostnet;

/// Resolves with how the daemon's process ended (e.g. `signal: 9`).
pub type Exited = Pin<Box<dyn Future<Output = String> + Send>>;

/// A daemon that answers and passed its self-check.
pub struct Running<D, P> {
    /// The Docker API, for the wipe.
    pub docker: D,
    /// Whether it still lives and answers, for the health watch and `/readyz`.
    pub probe: P,
    /// Its version and storage driver, for registration and the logs.
    pub info: DaemonInfo,
    /// Its exit, when it is the agent's own child (an adopted daemon is not:
    /// only the probe can watch it). Dropping this ends a child daemon.
    pub exited: Option<Exited>,
    /// How the host is wiped after a lease.
    pub wipe: WipePath,
}

/// How a host is wiped after a lease.
#[derive(Clone)]
pub enum WipePath {
    /// Replace dockerd on an empty data root ([`Replacer`]).
    Fresh(Arc<Replacer>),
    /// Through the Docker API, and why the fast path is not taken.
    Api(&'static str),
}

impl std::fmt::Debug for WipePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WipePath::Fresh(_) => f.write_str("Fresh"),
            WipePath::Api(why) => write!(f, "Api({why})"),
        }
    }
}

impl<D, P> std::fmt::Debug for Running<D, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("info", &self.info)
            .field("child", &self.exited.is_some())
            .finish_non_exhaustive()
    }
}

/// Why the host's daemon could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("booting the host: {0}")]
    Boot(#[from] DockerdError),
    #[error("taking over host {host_id}: {reason}")]
    Adopt { host_id: String, reason: String },
}

/// Where the host's dockerd comes from.
pub trait Daemon: Send + Sync + 'static {
    type Docker: DockerOps;
    type Probe: Probe + Clone;

    /// Starts a fresh daemon and waits until it answers and passes its
    /// self-check.
    fn boot(
        &self,
    ) -> impl Future<Output = Result<Running<Self::Docker, Self::Probe>, DaemonError>> + Send;

    /// Takes over the daemon a previous agent of this host started, if it
    /// still runs and answers; a host without a working dockerd cannot be
    /// trusted.
    fn adopt(
        &self,
    ) -> impl Future<Output = Result<Running<Self::Docker, Self::Probe>, DaemonError>> + Send;
}

/// The host's real dockerd, started as the agent's child process.
#[derive(Debug, Clone)]
pub struct Dockerd {
    spec: DockerdSpec,
    boot_timeout: Duration,
    old_root: OldRoot,
}

impl Dockerd {
    /// A dockerd started per `spec`, given `boot_timeout` to answer.
    pub fn new(spec: DockerdSpec, boot_timeout: Duration) -> Self {
        Dockerd {
            spec,
            boot_timeout,
            old_root: OldRoot::LeaveToTeardown,
        }
    }

    /// What becomes of a data root a wipe moved aside (recycle mode deletes
    /// it in the background; by default the host's teardown does).
    pub fn with_old_root(mut self, old_root: OldRoot) -> Self {
        self.old_root = old_root;
        self
    }

    fn paths(&self) -> &HostPaths {
        &self.spec.paths
    }

    fn probe(&self, docker: &BollardDocker) -> DaemonProbe {
        DaemonProbe {
            docker: docker.clone(),
            pidfile: self.paths().pidfile.clone(),
            replacing: None,
        }
    }
}

impl Daemon for Dockerd {
    type Docker = BollardDocker;
    type Probe = DaemonProbe;

    async fn boot(&self) -> Result<Running<BollardDocker, DaemonProbe>, DaemonError> {
        let spec = &self.spec;
        let t = std::time::Instant::now();
        let mut child = spec.spawn().await?;
        let spawned = t.elapsed();
        let docker = dockerd::wait_ping(&mut child, &spec.paths, self.boot_timeout).await?;
        let answered = t.elapsed();
        let info = dockerd::checks(spec, &child, &docker).await?;
        // Where a boot's time goes (BENCHMARKS.md, P3).
        tracing::info!(
            spawn_ms = dockerd::millis(spawned),
            first_ping_ms = dockerd::millis(answered),
            checks_ms = dockerd::millis(t.elapsed() - answered),
            "dockerd booted"
        );
        let replacer = Replacer::new(
            spec.clone(),
            self.boot_timeout,
            self.old_root,
            docker.clone(),
            child,
        );
        let probe = DaemonProbe {
            replacing: Some(replacer.replacing()),
            ..self.probe(&docker)
        };
        Ok(Running {
            probe,
            docker,
            info,
            exited: Some(Box::pin(replacer.clone().exited())),
            wipe: WipePath::Fresh(replacer),
        })
    }

    async fn adopt(&self) -> Result<Running<BollardDocker, DaemonProbe>, DaemonError> {
        let paths = self.paths();
        let fail = |reason: String| DaemonError::Adopt {
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
        // The ping was at our API version: dockerd speaks it (see
        // `dockerd::wait_ping`).
        let info = docker.info().await.map_err(|e| fail(e.to_string()))?;
        // The rules are checked (and put back if missing) on every take-over.
        hostnet::apply(self.spec.network, self.spec.netns.as_deref())
            .await
            .map_err(DockerdError::from)?;
        Ok(Running {
            probe: self.probe(&docker),
            docker,
            info,
            exited: None,
            wipe: WipePath::Api("dockerd was started by an earlier agent"),
        })
    }
}
