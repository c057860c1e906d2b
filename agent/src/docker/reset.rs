//! The fast wipe: instead of asking dockerd to stop and remove each
//! container, image, volume and network, end every process of the host at
//! once, move dockerd's data root aside (a rename), start a fresh dockerd
//! on an empty data root, and delete the old one while the host is already
//! back (recycle mode) or leave it to the host's teardown (single-use).
//!
//! The steps ([`Replacer::wipe`]):
//!
//! 1. count what the daemon holds and prune its build cache (the report's
//!    "removed" figures and bytes reclaimed);
//! 2. kill, with SIGKILL and in passes until nothing is left: dockerd,
//!    containerd and the shims (by the host's paths in their command lines),
//!    every process in the host's network namespace and container cgroup,
//!    and every process that shares a mount or PID namespace with one of
//!    those (a process that moved itself out of its container's cgroup);
//!    then remove the cgroups and unmount whatever is mounted under the
//!    host's directories ([`cleanup::empty`]);
//! 3. delete the bridges the old daemon made in the host's own namespace
//!    (their routes would make the new daemon's address pools look taken),
//!    and move the data root and the exec root aside (attributes such as
//!    `chattr +i` on the data root itself are cleared first);
//! 4. start dockerd exactly as at boot ([`DockerdSpec::spawn`], `/_ping`,
//!    the self-check, no TCP listener, the host's network rules);
//! 5. verify: the API wipe runs against the fresh daemon (it finds nothing
//!    to remove, and checks containers, images, volumes, networks, build
//!    cache, plugins, swarm state and the namespace's TCP listeners as
//!    after any wipe).
//!
//! A failure after the kill leaves no daemon to fall back on: the report
//! is then not verified, and the host is destroyed like any host whose
//! wipe failed. The API wipe ([`crate::docker::wipe::wipe`]) remains the
//! path for a daemon the agent did not start itself (adopted after an agent
//! restart); its report says so.
//!
//! While a replacement runs, the health watchers must not take the planned
//! exit of dockerd for a failure: [`Replacer::replacing`] tells them, and
//! [`Replacer::exited`] resolves only on an exit nobody planned.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use berth_proto::v1::WipeReport;
use tokio::process::Child;
use tokio::sync::Notify;

use crate::docker::client::{BollardDocker, DockerOps};
use crate::docker::dockerd::{self, DockerdError, DockerdSpec};
use crate::docker::wipe;
use crate::provider::cleanup::{self, Scope};
use crate::provider::hostnet::HostNetwork;
use crate::provider::netns;

/// `WipeReport.method` of a wipe that replaced the data root.
pub const METHOD_FRESH: &str = "fresh-data-root";
/// `WipeReport.method` of a wipe through the Docker API.
pub const METHOD_API: &str = "api";
/// Suffix of a data root or exec root moved aside (`docker.old-N`).
pub const OLD_SUFFIX: &str = ".old-";

/// Whether an old tree is deleted right away, in the background, or left
/// to the host's teardown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldRoot {
    /// Recycle mode: the host serves again, the old tree must go.
    DeleteInBackground,
    /// Single-use: the host is destroyed next, its directories with it.
    LeaveToTeardown,
}

/// The host's dockerd as a child the agent may replace.
pub struct Replacer {
    spec: DockerdSpec,
    boot_timeout: Duration,
    scope: Scope,
    old_root: OldRoot,
    /// The client of the daemon running now.
    docker: std::sync::Mutex<BollardDocker>,
    /// The running daemon's process, until the exit watcher takes it.
    child: std::sync::Mutex<Option<Child>>,
    /// Set while a replacement runs: dockerd's exit is planned.
    replacing: Arc<AtomicBool>,
    /// A new child (or a failed replacement) is there for the exit watcher.
    swapped: Notify,
    /// Why the last replacement left no daemon, if it did.
    failed: std::sync::Mutex<Option<String>>,
    /// Old trees moved aside so far (names them).
    generation: AtomicU64,
    /// Background deletions of old trees, for tests and the benchmarks.
    deletions: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Replacer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replacer")
            .field("data_root", &self.spec.paths.data_root)
            .field("old_root", &self.old_root)
            .finish_non_exhaustive()
    }
}

/// Everything a host named by `spec` owns that a replacement must end:
/// processes and mounts under its directories, its namespace's processes,
/// its container cgroup. Never the namespace, veths or directories.
pub fn kill_scope(spec: &DockerdSpec) -> Scope {
    let p = &spec.paths;
    let mut path_prefixes = cleanup::path_prefixes(&p.host_dir, "");
    path_prefixes.extend(cleanup::path_prefixes(&p.run_dir, ""));
    Scope {
        path_prefixes,
        netns: spec
            .netns
            .as_ref()
            .and_then(|n| n.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .into_iter()
            .collect(),
        veths: vec![],
        cgroups: vec![spec.cgroup_parent.clone()],
        dirs: vec![],
    }
}

impl Replacer {
    /// A replacer for the daemon `child` started per `spec` and answering
    /// through `docker`.
    pub fn new(
        spec: DockerdSpec,
        boot_timeout: Duration,
        old_root: OldRoot,
        docker: BollardDocker,
        child: Child,
    ) -> Arc<Self> {
        Arc::new(Replacer {
            scope: kill_scope(&spec),
            spec,
            boot_timeout,
            old_root,
            docker: std::sync::Mutex::new(docker),
            child: std::sync::Mutex::new(Some(child)),
            replacing: Arc::new(AtomicBool::new(false)),
            swapped: Notify::new(),
            failed: std::sync::Mutex::new(None),
            generation: AtomicU64::new(0),
            deletions: std::sync::Mutex::new(vec![]),
        })
    }

    /// True while a replacement runs (the health probe reads it).
    pub fn replacing(&self) -> Arc<AtomicBool> {
        self.replacing.clone()
    }

    /// Resolves with how dockerd ended when it ends unplanned (or a
    /// replacement could not start a new one). Dropping it ends the running
    /// child (`kill_on_drop`).
    pub async fn exited(self: Arc<Self>) -> String {
        loop {
            let child = self.child.lock().unwrap_or_else(|p| p.into_inner()).take();
            let Some(mut child) = child else {
                if let Some(why) = self.failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    return why;
                }
                self.swapped.notified().await;
                continue;
            };
            let status = child.wait().await;
            if self.replacing.load(Ordering::SeqCst) {
                tracing::debug!(?status, "dockerd stopped for its replacement");
                continue;
            }
            return match status {
                Ok(s) => s.to_string(),
                Err(e) => format!("wait failed: {e}"),
            };
        }
    }

    /// Waits until the old trees moved aside so far are deleted.
    pub async fn deleted(&self) {
        let tasks: Vec<_> =
            std::mem::take(&mut *self.deletions.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            let _ = t.await;
        }
    }

    fn client(&self) -> BollardDocker {
        self.docker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The fast wipe (module notes). Never fails: failures are in the report.
    pub async fn wipe(&self, lease_id: &str) -> WipeReport {
        let started = Instant::now();
        // What the daemon holds, for the report; the build cache is pruned
        // through the API, the one way to learn its size in bytes (BuildKit
        // keeps its records in a database of its own).
        let old = self.client();
        let (before, reclaimed) = tokio::join!(wipe::holdings(&old), old.prune_build_cache());
        let before = before.ok();
        self.replacing.store(true, Ordering::SeqCst);
        let replaced = self.replace().await;
        let report = match replaced {
            Ok(docker) => {
                *self.docker.lock().unwrap_or_else(|p| p.into_inner()) = docker.clone();
                self.replacing.store(false, Ordering::SeqCst);
                let mut r = wipe::wipe(&docker, lease_id).await;
                if let Some(b) = before {
                    let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
                    r.containers_removed = n(b.containers);
                    r.images_removed = n(b.images);
                    r.volumes_removed = n(b.volumes);
                    r.networks_removed = n(b.networks);
                }
                r.build_cache_reclaimed_bytes = reclaimed.unwrap_or_default();
                r
            }
            Err(e) => {
                let why = format!("replacing dockerd: {e}");
                tracing::error!(error = %why, "fast wipe failed; the host cannot be verified");
                *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.clone());
                self.replacing.store(false, Ordering::SeqCst);
                self.swapped.notify_one();
                WipeReport {
                    lease_id: lease_id.to_owned(),
                    verified: false,
                    error: why,
                    swarm_state_after: "unknown".into(),
                    ..WipeReport::default()
                }
            }
        };
        WipeReport {
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            method: METHOD_FRESH.to_owned(),
            ..report
        }
    }

    /// Steps 2 to 4; the client of the new daemon.
    async fn replace(&self) -> Result<BollardDocker, ReplaceError> {
        let t = Instant::now();
        let (report, error) = cleanup::empty(&self.scope).await;
        if let Some(e) = error {
            return Err(ReplaceError::Kill(e));
        }
        let killed_ms = t.elapsed().as_millis();
        // Reaped here when no exit watcher holds it; the old pidfile goes
        // either way (dockerd refuses to start while the pid in it exists,
        // and an unreaped one does).
        let unwatched = self.child.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut old) = unwatched {
            let _ = old.wait().await;
        }
        match std::fs::remove_file(&self.spec.paths.pidfile) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(error = %e, "removing dockerd's old pidfile"),
        }
        if self.spec.network == HostNetwork::Own {
            if let Some(ns) = self.scope.netns.first() {
                remove_bridges(ns).await?;
            }
        }
        let n = self.generation.fetch_add(1, Ordering::SeqCst);
        let p = &self.spec.paths;
        let mut old = vec![];
        for dir in [&p.data_root, &p.exec_root] {
            if let Some(aside) = move_aside(dir, n).await? {
                old.push(aside);
            }
        }
        let moved_ms = t.elapsed().as_millis();
        let mut child = self.spec.spawn().await?;
        let docker = dockerd::wait_ping(&mut child, p, self.boot_timeout).await?;
        dockerd::checks(&self.spec, &child, &docker).await?;
        *self.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
        self.swapped.notify_one();
        tracing::info!(
            killed = report.killed,
            unmounted = report.unmounted,
            killed_ms,
            moved_ms,
            ready_ms = t.elapsed().as_millis(),
            "dockerd replaced on an empty data root"
        );
        match self.old_root {
            OldRoot::LeaveToTeardown => {}
            OldRoot::DeleteInBackground => {
                let task = tokio::spawn(async move {
                    for dir in old {
                        let t = Instant::now();
                        match cleanup::remove_dir(&dir).await {
                            Ok(_) => {
                                tracing::debug!(dir = %dir.display(), took = ?t.elapsed(), "old tree deleted")
                            }
                            Err(e) => {
                                tracing::error!(dir = %dir.display(), error = %e, "deleting an old tree")
                            }
                        }
                    }
                });
                let mut tasks = self.deletions.lock().unwrap_or_else(|p| p.into_inner());
                tasks.retain(|t| !t.is_finished());
                tasks.push(task);
            }
        }
        Ok(docker)
    }
}

/// Deletes the bridges in the host's own namespace (`docker0`, `br-*`): a
/// killed dockerd leaves them, and their routes would make the subnets of
/// the new dockerd's address pools look taken.
async fn remove_bridges(netns: &str) -> Result<(), ReplaceError> {
    let fail = |e: String| ReplaceError::Bridges(format!("{netns}: {e}"));
    let out = tokio::process::Command::new("ip")
        .args(["-n", netns, "-o", "link", "show", "type", "bridge"])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
    }
    let lines: Vec<String> = bridge_names(&String::from_utf8_lossy(&out.stdout))
        .into_iter()
        .map(|n| format!("link del {n}"))
        .collect();
    if lines.is_empty() {
        return Ok(());
    }
    netns::ip_batch(Some(netns), &lines)
        .await
        .map_err(|e| fail(e.to_string()))
}

/// Interface names in `ip -o link show` output (`N: NAME: <...>` or
/// `N: NAME@PEER: <...>`).
fn bridge_names(table: &str) -> Vec<String> {
    table
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .filter(|n| !n.is_empty())
        .collect()
}

/// Renames `dir` to `dir.old-N` (`None` if there was nothing); clears the
/// immutable and append-only attributes of `dir` itself if the rename is
/// refused.
async fn move_aside(dir: &Path, n: u64) -> Result<Option<PathBuf>, ReplaceError> {
    let mut name = dir.as_os_str().to_owned();
    name.push(format!("{OLD_SUFFIX}{n}-{}", std::process::id()));
    let aside = PathBuf::from(name);
    let rename = || std::fs::rename(dir, &aside);
    match rename() {
        Ok(()) => Ok(Some(aside)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            tracing::info!(dir = %dir.display(), error = %e, "clearing attributes to move the data root aside");
            let target = dir.to_owned();
            let _ = tokio::task::spawn_blocking(move || clear_own_attributes(&target)).await;
            rename()
                .map(|()| Some(aside.clone()))
                .map_err(|source| ReplaceError::MoveAside {
                    path: dir.to_owned(),
                    source,
                })
        }
        Err(source) => Err(ReplaceError::MoveAside {
            path: dir.to_owned(),
            source,
        }),
    }
}

/// `chattr -f -i -a` on `dir` and its parent (not recursive: the tree
/// below is the background deletion's business).
fn clear_own_attributes(dir: &Path) {
    let mut cmd = std::process::Command::new("chattr");
    cmd.args(["-f", "-i", "-a"]).arg(dir);
    if let Some(parent) = dir.parent() {
        cmd.arg(parent);
    }
    let _ = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

/// Why a replacement left no daemon.
#[derive(Debug, thiserror::Error)]
pub enum ReplaceError {
    #[error("ending the host's processes: {0}")]
    Kill(cleanup::CleanupError),
    #[error("moving {path:?} aside: {source}")]
    MoveAside {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("removing the old daemon's bridges in {0}")]
    Bridges(String),
    #[error("starting the new dockerd: {0}")]
    Start(#[from] DockerdError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_names_are_read_from_ip_link_output() {
        let table = "3: docker0: <NO-CARRIER,BROADCAST,MULTICAST,UP> mtu 1500 qdisc noqueue state DOWN mode DEFAULT group default \\    link/ether 02:42:ac:11:00:01 brd ff:ff:ff:ff:ff:ff\n\
                     7: br-0a1b2c3d4e5f: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP mode DEFAULT\n\
                     9: br-x@if2: <BROADCAST> mtu 1500\n";
        assert_eq!(bridge_names(table), ["docker0", "br-0a1b2c3d4e5f", "br-x"]);
        assert!(bridge_names("").is_empty());
    }
}
