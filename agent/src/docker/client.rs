//! The agent's view of its dockerd: the [`DockerOps`] trait (the operations
//! wiping needs, so the driver and the wipe can be tested with a fake) and its
//! bollard implementation over the host's unix socket, plus the boot-time
//! checks (`/_ping`, `info`). Every call is bounded by [`DOCKER_CALL_TIMEOUT`].

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::query_parameters::{
    ListContainersOptions, ListImagesOptions, ListNetworksOptions, ListVolumesOptions,
    PruneBuildOptions, PruneImagesOptions, PruneNetworksOptions, PruneVolumesOptions,
    RemoveContainerOptions, RemoveImageOptions, RemoveVolumeOptions,
};
use bollard::{ClientVersion, Docker};

/// Bound on one Docker API call. Image removal of a large image and a
/// force-kill of a container both finish well inside this.
pub const DOCKER_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on one `/_ping` while waiting for dockerd to come up.
pub const PING_TIMEOUT: Duration = Duration::from_secs(1);
/// API version the agent speaks. dockerd 20.10 (Debian 12) supports at most
/// 1.41 and rejects every request with a higher version in its path, including
/// `/_ping`; newer daemons still accept 1.41. An older daemon refuses even
/// the ping at this version, so a daemon that answered it speaks 1.41 (see
/// `dockerd::wait_ping`): the agent needs dockerd 20.10 or newer.
pub const DOCKER_API_VERSION: ClientVersion = ClientVersion {
    major_version: 1,
    minor_version: 41,
};

/// Networks dockerd creates itself; they cannot and need not be removed.
pub const DEFAULT_NETWORKS: [&str; 3] = ["bridge", "host", "none"];

/// What a Docker call failed with.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("docker {op} {target:?}: not found")]
    NotFound { op: &'static str, target: String },
    #[error("docker {op} {target:?}: conflict: {message}")]
    Conflict {
        op: &'static str,
        target: String,
        message: String,
    },
    #[error("docker {op} {target:?} timed out after {timeout:?}")]
    Timeout {
        op: &'static str,
        target: String,
        timeout: Duration,
    },
    #[error("docker {op} {target:?} failed: {source}")]
    Api {
        op: &'static str,
        target: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("connecting to dockerd at {path:?}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: bollard::errors::Error,
    },
    /// A call made without bollard (the plugin API, the socket's peer).
    #[error("docker {op} {target:?} failed: {reason}")]
    Raw {
        op: &'static str,
        target: String,
        reason: String,
    },
}

/// A network as the wipe needs to see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkRef {
    pub id: String,
    pub name: String,
}

impl NetworkRef {
    /// dockerd's own networks, which a wipe keeps.
    pub fn is_default(&self) -> bool {
        DEFAULT_NETWORKS.contains(&self.name.as_str())
    }
}

/// The Docker operations a wipe needs. Implementations must be cheap to share
/// (`Arc`) and bound their own calls.
pub trait DockerOps: Send + Sync + 'static {
    /// Ids of all containers, running or not.
    fn list_containers(&self) -> impl Future<Output = Result<Vec<String>, DockerError>> + Send;
    /// Kills (if running) and removes a container with its anonymous volumes.
    fn remove_container(&self, id: &str) -> impl Future<Output = Result<(), DockerError>> + Send;
    /// Ids of all images, including intermediate ones.
    fn list_images(&self) -> impl Future<Output = Result<Vec<String>, DockerError>> + Send;
    /// Removes an image by id, with all its tags.
    fn remove_image(&self, id: &str) -> impl Future<Output = Result<(), DockerError>> + Send;
    /// Names of all volumes.
    fn list_volumes(&self) -> impl Future<Output = Result<Vec<String>, DockerError>> + Send;
    fn remove_volume(&self, name: &str) -> impl Future<Output = Result<(), DockerError>> + Send;
    /// All networks, default ones included.
    fn list_networks(&self) -> impl Future<Output = Result<Vec<NetworkRef>, DockerError>> + Send;
    fn remove_network(&self, id: &str) -> impl Future<Output = Result<(), DockerError>> + Send;
    /// Removes every image no container uses (every image, once the
    /// containers are gone) in one call; returns how many were deleted.
    fn prune_images(&self) -> impl Future<Output = Result<usize, DockerError>> + Send;
    /// Removes every volume no container uses, named ones included (API
    /// 1.41 semantics, which the pinned API version keeps on newer daemons).
    fn prune_volumes(&self) -> impl Future<Output = Result<usize, DockerError>> + Send;
    /// Removes every user network no container uses.
    fn prune_networks(&self) -> impl Future<Output = Result<usize, DockerError>> + Send;
    /// Removes all build cache; returns the bytes reclaimed.
    fn prune_build_cache(&self) -> impl Future<Output = Result<u64, DockerError>> + Send;
    /// Number of build cache records dockerd still holds.
    fn count_build_cache(&self) -> impl Future<Output = Result<usize, DockerError>> + Send;
    /// The daemon's swarm membership (`Swarm.LocalNodeState` of `info`).
    fn swarm_state(&self) -> impl Future<Output = Result<SwarmState, DockerError>> + Send;
    /// Leaves the swarm, forced (a manager's state goes with it).
    fn leave_swarm(&self) -> impl Future<Output = Result<(), DockerError>> + Send;
    /// Names of the managed plugins (`docker plugin ls`), enabled or not.
    fn list_plugins(&self) -> impl Future<Output = Result<Vec<String>, DockerError>> + Send;
    /// Disables (forced) and removes a managed plugin.
    fn remove_plugin(&self, name: &str) -> impl Future<Output = Result<(), DockerError>> + Send;
    /// TCP listeners in the daemon's network namespace that this agent
    /// process does not hold (its front and status endpoint are its own).
    fn stray_listeners(&self) -> impl Future<Output = Result<Vec<SocketAddr>, DockerError>> + Send;
}

/// A daemon's swarm membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwarmState {
    /// Not part of a swarm: what a wiped host must show.
    Inactive,
    /// Anything else (`active`, `pending`, `error`, `locked`), as dockerd says it.
    Member(String),
}

impl SwarmState {
    pub fn name(&self) -> &str {
        match self {
            SwarmState::Inactive => "inactive",
            SwarmState::Member(s) => s,
        }
    }
}

/// [`DockerOps`] over a dockerd unix socket, through bollard.
#[derive(Clone)]
pub struct BollardDocker {
    docker: Docker,
    socket: PathBuf,
}

impl std::fmt::Debug for BollardDocker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BollardDocker")
            .field("socket", &self.socket)
            .finish()
    }
}

/// What the boot self-check learned from `info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonInfo {
    pub server_version: String,
    pub storage_driver: String,
    pub containers: i64,
    pub images: i64,
}

impl BollardDocker {
    /// A client for the socket (no I/O yet).
    pub fn new(socket: &Path) -> Result<Self, DockerError> {
        let path = socket.to_string_lossy();
        let docker =
            Docker::connect_with_unix(&path, DOCKER_CALL_TIMEOUT.as_secs(), &DOCKER_API_VERSION)
                .map_err(|source| DockerError::Connect {
                    path: socket.to_owned(),
                    source,
                })?;
        Ok(BollardDocker {
            docker,
            socket: socket.to_owned(),
        })
    }

    /// One `/_ping`, bounded by [`PING_TIMEOUT`].
    pub async fn ping(&self) -> Result<(), DockerError> {
        call("ping", "", PING_TIMEOUT, self.docker.ping())
            .await
            .map(drop)
    }

    /// The `info` self-check: the daemon must answer and name its version.
    pub async fn info(&self) -> Result<DaemonInfo, DockerError> {
        let info = call("info", "", DOCKER_CALL_TIMEOUT, self.docker.info()).await?;
        Ok(DaemonInfo {
            server_version: info.server_version.unwrap_or_default(),
            storage_driver: info.driver.unwrap_or_default(),
            containers: info.containers.unwrap_or_default(),
            images: info.images.unwrap_or_default(),
        })
    }
}

/// Runs one bollard call under a timeout and classifies its error.
async fn call<T>(
    op: &'static str,
    target: &str,
    timeout: Duration,
    fut: impl Future<Output = Result<T, bollard::errors::Error>>,
) -> Result<T, DockerError> {
    match tokio::time::timeout(timeout, fut).await {
        Err(_) => Err(DockerError::Timeout {
            op,
            target: target.to_owned(),
            timeout,
        }),
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(classify(op, target, source)),
    }
}

fn classify(op: &'static str, target: &str, source: bollard::errors::Error) -> DockerError {
    use bollard::errors::Error as E;
    match source {
        E::DockerResponseServerError {
            status_code: 404, ..
        } => DockerError::NotFound {
            op,
            target: target.to_owned(),
        },
        E::DockerResponseServerError {
            status_code: 409,
            message,
        } => DockerError::Conflict {
            op,
            target: target.to_owned(),
            message,
        },
        source => DockerError::Api {
            op,
            target: target.to_owned(),
            source,
        },
    }
}

impl DockerOps for BollardDocker {
    async fn list_containers(&self) -> Result<Vec<String>, DockerError> {
        let opts = ListContainersOptions {
            all: true,
            ..Default::default()
        };
        let list = call(
            "list containers",
            "",
            DOCKER_CALL_TIMEOUT,
            self.docker.list_containers(Some(opts)),
        )
        .await?;
        Ok(list.into_iter().filter_map(|c| c.id).collect())
    }

    async fn remove_container(&self, id: &str) -> Result<(), DockerError> {
        // force = SIGKILL first; v = take the container's anonymous volumes too.
        let opts = RemoveContainerOptions {
            force: true,
            v: true,
            link: false,
        };
        call(
            "remove container",
            id,
            DOCKER_CALL_TIMEOUT,
            self.docker.remove_container(id, Some(opts)),
        )
        .await
    }

    async fn list_images(&self) -> Result<Vec<String>, DockerError> {
        let opts = ListImagesOptions {
            all: true,
            ..Default::default()
        };
        let list = call(
            "list images",
            "",
            DOCKER_CALL_TIMEOUT,
            self.docker.list_images(Some(opts)),
        )
        .await?;
        Ok(list.into_iter().map(|i| i.id).collect())
    }

    async fn remove_image(&self, id: &str) -> Result<(), DockerError> {
        let opts = RemoveImageOptions {
            force: true,
            noprune: false,
        };
        call(
            "remove image",
            id,
            DOCKER_CALL_TIMEOUT,
            self.docker.remove_image(id, Some(opts), None),
        )
        .await
        .map(drop)
    }

    async fn list_volumes(&self) -> Result<Vec<String>, DockerError> {
        let list = call(
            "list volumes",
            "",
            DOCKER_CALL_TIMEOUT,
            self.docker.list_volumes(None::<ListVolumesOptions>),
        )
        .await?;
        Ok(list
            .volumes
            .unwrap_or_default()
            .into_iter()
            .map(|v| v.name)
            .collect())
    }

    async fn remove_volume(&self, name: &str) -> Result<(), DockerError> {
        let opts = RemoveVolumeOptions { force: true };
        call(
            "remove volume",
            name,
            DOCKER_CALL_TIMEOUT,
            self.docker.remove_volume(name, Some(opts)),
        )
        .await
    }

    async fn list_networks(&self) -> Result<Vec<NetworkRef>, DockerError> {
        let list = call(
            "list networks",
            "",
            DOCKER_CALL_TIMEOUT,
            self.docker.list_networks(None::<ListNetworksOptions>),
        )
        .await?;
        Ok(list
            .into_iter()
            .filter_map(|n| {
                Some(NetworkRef {
                    id: n.id?,
                    name: n.name.unwrap_or_default(),
                })
            })
            .collect())
    }

    async fn remove_network(&self, id: &str) -> Result<(), DockerError> {
        call(
            "remove network",
            id,
            DOCKER_CALL_TIMEOUT,
            self.docker.remove_network(id),
        )
        .await
    }

    async fn prune_images(&self) -> Result<usize, DockerError> {
        // dangling=false: every unused image, not only untagged ones.
        let opts = PruneImagesOptions {
            filters: Some([("dangling".to_owned(), vec!["false".to_owned()])].into()),
        };
        let res = call(
            "prune images",
            "",
            DOCKER_CALL_TIMEOUT,
            self.docker.prune_images(Some(opts)),
        )
        .await?;
        Ok(res.images_deleted.map(|d| d.len()).unwrap_or(0))
    }

    async fn prune_volumes(&self) -> Result<usize, DockerError> {
        let res = call(
            "prune volumes",
            "",
            DOCKER_CALL_TIMEOUT,
            self.docker.prune_volumes(None::<PruneVolumesOptions>),
        )
        .await?;
        Ok(res.volumes_deleted.map(|d| d.len()).unwrap_or(0))
    }

    async fn prune_networks(&self) -> Result<usize, DockerError> {
        let res = call(
            "prune networks",
            "",
            DOCKER_CALL_TIMEOUT,
            self.docker.prune_networks(None::<PruneNetworksOptions>),
        )
        .await?;
        Ok(res.networks_deleted.map(|d| d.len()).unwrap_or(0))
    }

    async fn prune_build_cache(&self) -> Result<u64, DockerError> {
        let opts = PruneBuildOptions {
            all: Some(true),
            ..Default::default()
        };
        let res = call(
            "prune build cache",
            "",
            DOCKER_CALL_TIMEOUT,
            self.docker.prune_build(Some(opts)),
        )
        .await?;
        Ok(res
            .space_reclaimed
            .and_then(|b| u64::try_from(b).ok())
            .unwrap_or(0))
    }

    async fn count_build_cache(&self) -> Result<usize, DockerError> {
        let df = call("system df", "", DOCKER_CALL_TIMEOUT, self.docker.df(None)).await?;
        Ok(df.build_cache.map(|b| b.len()).unwrap_or(0))
    }

    async fn swarm_state(&self) -> Result<SwarmState, DockerError> {
        let info = call("info", "", DOCKER_CALL_TIMEOUT, self.docker.info()).await?;
        let state = info
            .swarm
            .and_then(|s| s.local_node_state)
            .map(|s| s.to_string())
            .unwrap_or_default();
        Ok(match state.as_str() {
            // Older daemons leave the field out when there is no swarm.
            "inactive" | "" => SwarmState::Inactive,
            other => SwarmState::Member(other.to_owned()),
        })
    }

    async fn leave_swarm(&self) -> Result<(), DockerError> {
        let opts = bollard::query_parameters::LeaveSwarmOptionsBuilder::default()
            .force(true)
            .build();
        call(
            "swarm leave",
            "",
            DOCKER_CALL_TIMEOUT,
            self.docker.leave_swarm(Some(opts)),
        )
        .await
    }

    async fn list_plugins(&self) -> Result<Vec<String>, DockerError> {
        let body = raw::request(&self.socket, "GET", "/plugins", "list plugins").await?;
        let plugins: Vec<serde_json::Value> =
            serde_json::from_slice(&body).map_err(|e| DockerError::Raw {
                op: "list plugins",
                target: String::new(),
                reason: format!("unexpected answer: {e}"),
            })?;
        Ok(plugins
            .iter()
            .filter_map(|p| p.get("Name")?.as_str().map(str::to_owned))
            .collect())
    }

    async fn remove_plugin(&self, name: &str) -> Result<(), DockerError> {
        // The name goes into a URL path: only what plugin references hold.
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/:@".contains(c))
        {
            return Err(DockerError::Raw {
                op: "remove plugin",
                target: name.to_owned(),
                reason: "unexpected characters in the plugin name".into(),
            });
        }
        let path = format!("/plugins/{name}?force=1");
        raw::request(&self.socket, "DELETE", &path, "remove plugin")
            .await
            .map(drop)
    }

    async fn stray_listeners(&self) -> Result<Vec<SocketAddr>, DockerError> {
        let err = |reason: String| DockerError::Raw {
            op: "list TCP listeners",
            target: self.socket.display().to_string(),
            reason,
        };
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| err(e.to_string()))?;
        let pid = stream
            .peer_cred()
            .map_err(|e| err(e.to_string()))?
            .pid()
            .ok_or_else(|| err("the socket's peer has no pid".into()))?;
        let me = i32::try_from(std::process::id()).map_err(|e| err(e.to_string()))?;
        crate::docker::listeners::listeners_in_netns_of(Path::new("/proc"), pid, &[me])
            .map_err(|e| err(e.to_string()))
    }
}

/// The few Docker API calls bollard has no method for (the plugin API):
/// one HTTP/1.0 request over the unix socket, bounded by
/// [`DOCKER_CALL_TIMEOUT`]. HTTP/1.0 keeps the answer un-chunked and the
/// connection closes after it.
mod raw {
    use std::path::Path;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::{DOCKER_API_VERSION, DOCKER_CALL_TIMEOUT, DockerError};

    /// Largest answer read (a plugin list is a few KiB).
    const MAX_ANSWER: u64 = 4 << 20;

    pub async fn request(
        socket: &Path,
        method: &str,
        path: &str,
        op: &'static str,
    ) -> Result<Vec<u8>, DockerError> {
        let err = |reason: String| DockerError::Raw {
            op,
            target: path.to_owned(),
            reason,
        };
        let exchange = async {
            let mut s = tokio::net::UnixStream::connect(socket)
                .await
                .map_err(|e| err(e.to_string()))?;
            let v = &DOCKER_API_VERSION;
            let req = format!(
                "{method} /v{}.{}{path} HTTP/1.0\r\nHost: docker\r\n\r\n",
                v.major_version, v.minor_version
            );
            s.write_all(req.as_bytes())
                .await
                .map_err(|e| err(e.to_string()))?;
            let mut answer = Vec::new();
            s.take(MAX_ANSWER)
                .read_to_end(&mut answer)
                .await
                .map_err(|e| err(e.to_string()))?;
            Ok::<_, DockerError>(answer)
        };
        let answer = tokio::time::timeout(DOCKER_CALL_TIMEOUT, exchange)
            .await
            .map_err(|_| DockerError::Timeout {
                op,
                target: path.to_owned(),
                timeout: DOCKER_CALL_TIMEOUT,
            })??;
        let split = answer
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| err("no HTTP header in the answer".into()))?;
        let head = String::from_utf8_lossy(&answer[..split]);
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| err(format!("bad status line {:?}", head.lines().next())))?;
        let body = answer[split + 4..].to_vec();
        match status {
            200..=299 => Ok(body),
            404 => Err(DockerError::NotFound {
                op,
                target: path.to_owned(),
            }),
            code => Err(err(format!(
                "HTTP {code}: {}",
                String::from_utf8_lossy(&body).trim()
            ))),
        }
    }
}
