//! Where hosts come from and how they end. [`Provider`] is the seam, with
//! two implementations: [`Local`] here, and the EC2 provider in `ec2.rs`.
//! A local host is a network namespace with an address of its own (or the
//! agent's namespace with `--no-netns`), a dockerd started by the agent, and
//! directories under the state and run dirs. [`hostnet`] holds the rules
//! that make a host's own network behave like a stock Docker host's.
//! Terminating a local host
//! destroys all of that; the supervisor (`berth up`) then starts a fresh
//! agent, i.e. a fresh host. [`teardown`] is that destruction, shared with
//! the EC2 provider (whose machine goes away on top).

pub mod cleanup;
pub mod ec2;
pub mod hostnet;
pub mod netns;

use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use berth_aws::{Interruption, TargetLifecycle};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::Rng;

use crate::config::Config;
use crate::docker::dockerd::{self, HostPaths};
use cleanup::{CleanupError, Scope};
use hostnet::HostNetwork;
use netns::{Block, NetnsError};

/// How long dockerd gets after SIGTERM before SIGKILL. It was started with
/// `--shutdown-timeout 2` (containers get 2 s), plus its own teardown.
pub const DOCKERD_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often to check whether dockerd has exited.
const STOP_POLL: Duration = Duration::from_millis(20);
/// Attempts at a free host id with `--no-netns` (the run dir is the lock).
const MAX_ID_ATTEMPTS: usize = 64;

/// Who this host is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// What the coordinator knows the host by (the EC2 instance id).
    pub host_id: String,
    /// The name of the host's directories and cgroup on this machine; it
    /// starts with the agent's prefix, so `berth-agent sweep` finds them.
    /// Locally the same as `host_id`.
    pub local_id: String,
    pub host_addr: IpAddr,
    /// `/run/netns/NAME` of the host's namespace; `None` without one.
    pub netns: Option<PathBuf>,
    /// Whether the network namespace the host's dockerd runs in is the
    /// host's own (a namespace of its own, an EC2 instance) or shared with
    /// the machine (`--no-netns`).
    pub network: HostNetwork,
    pub instance_type: String,
    pub zone: String,
}

impl Identity {
    /// The resolver the host's dockerd gets (rule 3 of
    /// [`hostnet`](crate::provider::hostnet)): a host in a network namespace
    /// of its own on this machine has none beyond its own address; an EC2
    /// instance and a host sharing the machine's network keep the machine's.
    pub fn dns(&self) -> hostnet::HostDns {
        match self.netns {
            Some(_) => hostnet::HostDns::OwnAddress(self.host_addr),
            None => hostnet::HostDns::Machine,
        }
    }
}

/// What a provider failed at.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("creating the host's network namespace: {0}")]
    Netns(#[from] NetnsError),
    #[error("wiring the host's network namespace: {0}")]
    Wiring(String),
    #[error("claiming a host directory under {dir:?}: {source}")]
    Claim {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no free host id under {0:?}")]
    NoFreeId(PathBuf),
    #[error("tearing the host down: {0}")]
    Cleanup(#[from] CleanupError),
    #[error("terminate called before identity")]
    NoIdentity,
    #[error("host {0} cannot be taken over: {1}")]
    Resume(String, String),
    #[error("instance metadata: {0}")]
    Metadata(#[from] berth_aws::ImdsError),
    #[error(
        "ending instance {instance_id}: {api}; and the power-off fallback failed too: {poweroff}"
    )]
    EndInstance {
        instance_id: String,
        api: Box<berth_aws::Ec2Error>,
        poweroff: String,
    },
}

/// Where hosts come from and how they end.
pub trait Provider: Send + Sync + 'static {
    /// The value of `Register.provider`.
    fn name(&self) -> &'static str;
    /// Learns (locally: creates) the host's identity. Called once, at boot.
    fn identity(&self) -> impl Future<Output = Result<Identity, ProviderError>> + Send;
    /// Ends the host for good. Locally: stops dockerd and removes everything
    /// the host created; the agent exits afterwards.
    fn terminate(&self) -> impl Future<Output = Result<(), ProviderError>> + Send;
    /// Where Auto Scaling is taking the machine, for providers that have
    /// warm pools; `None` (the default) means "always in service" and no
    /// polling.
    fn lifecycle(
        &self,
    ) -> impl Future<Output = Result<Option<TargetLifecycle>, ProviderError>> + Send {
        async { Ok(None) }
    }
    /// Whether the cloud announced it will take the machine back (an EC2
    /// spot interruption or rebalance recommendation); `None` (the default)
    /// for machines nobody takes back.
    fn interruption(
        &self,
    ) -> impl Future<Output = Result<Option<Interruption>, ProviderError>> + Send {
        async { Ok(None) }
    }
    /// Whether the machine outlives its agent, so that a shutdown signal
    /// while idle must not end it (see `state::Host::keep_on_shutdown`).
    fn machine_outlives_agent(&self) -> bool {
        false
    }
    /// Stops this agent's host (dockerd, directories) and leaves the machine
    /// running. Only called when [`Provider::machine_outlives_agent`]; by
    /// default the same as `terminate`.
    fn stop(&self) -> impl Future<Output = Result<(), ProviderError>> + Send {
        self.terminate()
    }
    /// The root-side address of the host's own network, where a relay can
    /// carry the coordinator link through it (`--link-via-host-net`); only
    /// local hosts in a namespace have one.
    fn gateway(&self) -> Option<std::net::Ipv4Addr> {
        None
    }
    /// Waits until the host's network (address, routes) is in place. The
    /// local provider wires a new namespace while dockerd starts, which
    /// only needs the namespace to exist; the host is announced and its
    /// listeners bound only after this. By default there is nothing to wait for.
    fn network_ready(&self) -> impl Future<Output = Result<(), ProviderError>> + Send {
        async { Ok(()) }
    }
}

/// The development and test provider: hosts on this machine.
#[derive(Debug)]
pub struct Local {
    state_dir: PathBuf,
    run_dir: PathBuf,
    prefix: String,
    no_netns: bool,
    host_addr: IpAddr,
    /// Set by `identity`, read by `terminate`.
    host: Mutex<Option<LocalHost>>,
    /// The namespace's wiring, started by `identity`, awaited by `network_ready`.
    wiring: tokio::sync::Mutex<Wiring>,
}

/// Where the wiring of a new namespace stands.
#[derive(Debug, Default)]
enum Wiring {
    /// Nothing to wire (no namespace, or a host taken over).
    #[default]
    None,
    Running(tokio::task::JoinHandle<Result<(), NetnsError>>),
    /// Finished; a failure is kept as its message for every later caller.
    Done(Result<(), String>),
}

#[derive(Debug, Clone)]
struct LocalHost {
    host_id: String,
    block: Option<Block>,
}

impl Local {
    pub fn new(config: &Config) -> Self {
        Local {
            state_dir: config.state_dir.clone(),
            run_dir: config.run_dir.clone(),
            prefix: config.prefix.clone(),
            no_netns: config.no_netns,
            host_addr: config.host_addr,
            host: Mutex::new(None),
            wiring: tokio::sync::Mutex::new(Wiring::None),
        }
    }

    fn remember(&self, host: LocalHost) {
        *self.host.lock().unwrap_or_else(|p| p.into_inner()) = Some(host);
    }

    fn remembered(&self) -> Option<LocalHost> {
        self.host.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Without a namespace there is no veth to lock a block; creating the
    /// host's run directory is the lock instead.
    fn claim_without_netns(&self) -> Result<String, ProviderError> {
        std::fs::create_dir_all(&self.run_dir).map_err(|source| ProviderError::Claim {
            dir: self.run_dir.clone(),
            source,
        })?;
        for _ in 0..MAX_ID_ATTEMPTS {
            let n: u32 = rand::rng().random_range(0..netns::BLOCKS);
            let host_id = format!("{}{n:04x}", self.prefix);
            let dir = self.run_dir.join(&host_id);
            match std::fs::create_dir(&dir) {
                Ok(()) => return Ok(host_id),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(source) => return Err(ProviderError::Claim { dir, source }),
            }
        }
        Err(ProviderError::NoFreeId(self.run_dir.clone()))
    }

    /// Takes over host `host_id`, left behind by an agent that died. The
    /// host is remembered even when it cannot be taken over, so that
    /// `terminate` destroys what is left of it.
    pub fn resume(&self, host_id: &str) -> Result<Identity, ProviderError> {
        let block = if self.no_netns {
            None
        } else {
            let index = netns::block_of(&self.prefix, host_id).ok_or_else(|| {
                ProviderError::Resume(host_id.to_owned(), "not a host id of this prefix".into())
            })?;
            Some(Block::new(&self.prefix, index))
        };
        self.remember(LocalHost {
            host_id: host_id.to_owned(),
            block: block.clone(),
        });
        match &block {
            Some(b) => {
                if !b.path().exists() {
                    return Err(ProviderError::Resume(
                        host_id.to_owned(),
                        format!("its network namespace {} is gone", b.path().display()),
                    ));
                }
                Ok(Identity {
                    host_id: host_id.to_owned(),
                    local_id: host_id.to_owned(),
                    host_addr: IpAddr::V4(b.host_addr),
                    netns: Some(b.path()),
                    network: HostNetwork::Own,
                    instance_type: String::new(),
                    zone: String::new(),
                })
            }
            None => {
                let dir = self.run_dir.join(host_id);
                if !dir.is_dir() {
                    return Err(ProviderError::Resume(
                        host_id.to_owned(),
                        format!("{} is gone", dir.display()),
                    ));
                }
                Ok(Identity {
                    host_id: host_id.to_owned(),
                    local_id: host_id.to_owned(),
                    host_addr: self.host_addr,
                    netns: None,
                    network: HostNetwork::Shared,
                    instance_type: String::new(),
                    zone: String::new(),
                })
            }
        }
    }

    /// Everything a local host owns, for `cleanup::destroy`.
    fn scope(&self, host: &LocalHost) -> Scope {
        host_scope(
            &self.state_dir,
            &self.run_dir,
            &host.host_id,
            host.block.as_ref(),
        )
    }
}

/// Everything a host named `local_id` owns on this machine: its
/// directories, what runs or is mounted below them, its cgroup, and its
/// namespace and veth if it has a block.
pub fn host_scope(
    state_dir: &Path,
    run_dir: &Path,
    local_id: &str,
    block: Option<&Block>,
) -> Scope {
    let paths = HostPaths::new(state_dir, run_dir, local_id);
    // Trailing slash: `berth-1a2b/` must not match `berth-1a2bc`.
    let mut path_prefixes = cleanup::path_prefixes(&paths.host_dir, "");
    path_prefixes.extend(cleanup::path_prefixes(&paths.run_dir, ""));
    Scope {
        path_prefixes,
        netns: block.iter().map(|b| b.name.clone()).collect(),
        veths: block.iter().map(|b| b.veth.clone()).collect(),
        cgroups: vec![cleanup::cgroup_name(local_id)],
        dirs: vec![paths.host_dir, paths.run_dir],
    }
}

/// Stops the host's dockerd and removes everything in its scope.
pub async fn teardown(scope: &Scope, paths: &HostPaths) -> Result<(), ProviderError> {
    stop_dockerd(paths).await;
    let report = cleanup::destroy(scope).await?;
    tracing::info!(?report, "host destroyed");
    Ok(())
}

impl Provider for Local {
    fn name(&self) -> &'static str {
        "local"
    }

    fn gateway(&self) -> Option<std::net::Ipv4Addr> {
        self.remembered()?.block.map(|b| b.gateway)
    }

    async fn network_ready(&self) -> Result<(), ProviderError> {
        let mut wiring = self.wiring.lock().await;
        let result = match std::mem::take(&mut *wiring) {
            Wiring::None => Ok(()),
            Wiring::Done(r) => r,
            Wiring::Running(task) => match task.await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(e) => Err(format!("wiring task: {e}")),
            },
        };
        *wiring = Wiring::Done(result.clone());
        result.map_err(ProviderError::Wiring)
    }

    #[tracing::instrument(skip(self), err)]
    async fn identity(&self) -> Result<Identity, ProviderError> {
        if self.no_netns {
            let host_id = self.claim_without_netns()?;
            self.remember(LocalHost {
                host_id: host_id.clone(),
                block: None,
            });
            return Ok(Identity {
                local_id: host_id.clone(),
                host_id,
                host_addr: self.host_addr,
                netns: None,
                network: HostNetwork::Shared,
                instance_type: String::new(),
                zone: String::new(),
            });
        }
        let (block, peer) = netns::create(&self.prefix).await?;
        self.remember(LocalHost {
            host_id: block.name.clone(),
            block: Some(block.clone()),
        });
        // Addresses and routes are set while dockerd starts; a failure
        // surfaces in `network_ready`, and `terminate` removes the block.
        let wired = block.clone();
        *self.wiring.lock().await =
            Wiring::Running(tokio::spawn(
                async move { netns::wire(&wired, &peer).await },
            ));
        Ok(Identity {
            host_id: block.name.clone(),
            local_id: block.name.clone(),
            host_addr: IpAddr::V4(block.host_addr),
            netns: Some(block.path()),
            network: HostNetwork::Own,
            instance_type: String::new(),
            zone: String::new(),
        })
    }

    #[tracing::instrument(skip(self), err)]
    async fn terminate(&self) -> Result<(), ProviderError> {
        let host = self.remembered().ok_or(ProviderError::NoIdentity)?;
        let paths = HostPaths::new(&self.state_dir, &self.run_dir, &host.host_id);
        teardown(&self.scope(&host), &paths).await
    }
}

/// SIGTERM to dockerd (per its pidfile), then SIGKILL after
/// [`DOCKERD_STOP_TIMEOUT`]. Whatever it leaves (containerd, shims) is
/// killed by the clean-up that follows.
pub async fn stop_dockerd(paths: &HostPaths) {
    let Some(pid) = dockerd::read_pid(&paths.pidfile) else {
        return;
    };
    // The pidfile could be stale and the pid reused: only signal a process
    // that is a dockerd of this host.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mine = format!("{}/", paths.run_dir.display());
    if !cleanup::cmdline_matches(&cmdline, &[mine]) {
        return;
    }
    if kill(Pid::from_raw(pid), Signal::SIGTERM).is_err() {
        return;
    }
    let deadline = tokio::time::Instant::now() + DOCKERD_STOP_TIMEOUT;
    while cleanup::alive(pid) {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(pid, "dockerd ignored SIGTERM; killing it");
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            break;
        }
        tokio::time::sleep(STOP_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_scope_is_limited_to_the_host() {
        let config = Config {
            state_dir: "/var/lib/berth/hosts".into(),
            run_dir: "/run/berth".into(),
            prefix: "bta-".into(),
            ..Config::default()
        };
        let local = Local::new(&config);
        let host = LocalHost {
            host_id: "bta-0001".into(),
            block: Some(Block::new("bta-", 1)),
        };
        let scope = local.scope(&host);
        assert_eq!(
            scope.path_prefixes,
            vec!["/var/lib/berth/hosts/bta-0001/", "/run/berth/bta-0001/"]
        );
        assert_eq!(scope.netns, vec!["bta-0001"]);
        assert_eq!(scope.veths, vec!["bb0001"]);
        assert_eq!(scope.cgroups, vec!["berth-bta-0001"]);
        assert_eq!(
            scope.dirs,
            vec![
                PathBuf::from("/var/lib/berth/hosts/bta-0001"),
                PathBuf::from("/run/berth/bta-0001")
            ]
        );
    }

    #[tokio::test]
    async fn no_netns_identity_claims_a_directory() {
        let run = std::env::temp_dir().join(format!("berth-provider-test-{}", std::process::id()));
        let config = Config {
            run_dir: run.clone(),
            state_dir: run.join("state"),
            prefix: "btp-".into(),
            no_netns: true,
            host_addr: "127.0.0.1".parse().unwrap(),
            ..Config::default()
        };
        let local = Local::new(&config);
        assert!(matches!(
            local.terminate().await,
            Err(ProviderError::NoIdentity)
        ));
        let id = local.identity().await.unwrap();
        assert!(
            id.host_id.starts_with("btp-") && id.host_id.len() == 8,
            "{}",
            id.host_id
        );
        assert_eq!(id.netns, None);
        assert!(run.join(&id.host_id).is_dir());
        local.terminate().await.unwrap();
        assert!(!run.join(&id.host_id).exists());
        std::fs::remove_dir_all(&run).unwrap();
    }
}
