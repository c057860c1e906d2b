//! Starting the host's own dockerd as a child process: its paths (data root
//! under the state dir; exec root, socket and pidfile under the short run dir,
//! because containerd's sockets under the exec root must fit the 108-byte
//! unix socket limit), its command line (unix socket only, never TCP;
//! iptables and forwarding managed only in a network namespace that is the
//! host's own, see `provider::hostnet`), where it runs (the host's network
//! namespace and a mount namespace of its own in which `/var/run/docker.sock`
//! is this dockerd, see [`mountns`](crate::docker::mountns)), and waiting
//! until it answers. Stopping it is the provider's job (`provider.rs`).

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::docker::client::{BollardDocker, DaemonInfo, DockerError};
use crate::docker::listeners;
use crate::docker::mountns::{self, MountNsError, RunView};
use crate::docker::registries::Registries;
use crate::provider::cleanup;
use crate::provider::hostnet::{self, HostDns, HostNetError, HostNetwork};

/// How often `/_ping` is tried while dockerd starts. Each try is a stat of
/// the socket path until it exists, then one request: cheap next to the
/// boot it shortens (a 20 ms interval cost 10 ms of boot on average).
pub const PING_INTERVAL: Duration = Duration::from_millis(5);
/// Unix socket paths longer than this cannot be bound (sun_path is 108 bytes
/// including the NUL); containerd adds `containerd/containerd.sock.ttrpc`
/// below the exec root.
pub const MAX_SOCKET_PATH: usize = 107;
/// Longest socket path containerd builds below the exec root.
const CONTAINERD_SOCKET_SUFFIX: &str = "/containerd/containerd.sock.ttrpc";
/// Lines of dockerd's log quoted in a boot error.
const LOG_TAIL_LINES: usize = 20;

/// What went wrong starting dockerd.
#[derive(Debug, thiserror::Error)]
pub enum DockerdError {
    #[error(
        "socket path {0:?} is too long for a unix socket ({MAX_SOCKET_PATH} bytes max); use a shorter run dir"
    )]
    PathTooLong(PathBuf),
    #[error("preparing {path:?}: {source}")]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting dockerd in the host's namespaces: {0}")]
    Spawn(#[from] MountNsError),
    #[error("dockerd exited during boot ({status}); log tail:\n{log_tail}")]
    ExitedEarly { status: String, log_tail: String },
    #[error(
        "dockerd did not answer /_ping within {timeout:?}; last error: {last}; log tail:\n{log_tail}"
    )]
    NoPing {
        timeout: Duration,
        last: String,
        log_tail: String,
    },
    #[error("dockerd self-check failed: {0}")]
    SelfCheck(#[from] DockerError),
    #[error(transparent)]
    TcpListener(#[from] crate::docker::listeners::ListenerError),
    #[error("dockerd wrote no pid to {0:?}; cannot check its listeners")]
    NoPid(PathBuf),
    #[error("the host's network rules: {0}")]
    HostNet(#[from] HostNetError),
}

/// Every path one host uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPaths {
    /// `STATE_DIR/HOST_ID`: data root, dockerd log, daemon.json.
    pub host_dir: PathBuf,
    /// `RUN_DIR/HOST_ID`: exec root, socket, pidfile.
    pub run_dir: PathBuf,
    pub data_root: PathBuf,
    pub exec_root: PathBuf,
    pub socket: PathBuf,
    pub pidfile: PathBuf,
    pub log: PathBuf,
    pub config_file: PathBuf,
    /// `HOST_DIR/etc-docker`: dockerd's `/etc/docker` inside its mount
    /// namespace (`certs.d` for the pool's registries).
    pub etc_docker: PathBuf,
    /// `HOST_DIR/resolv.conf`: dockerd's `/etc/resolv.conf` inside its
    /// mount namespace, when the host does not use the machine's.
    pub resolv_conf: PathBuf,
}

impl HostPaths {
    pub fn new(state_dir: &Path, run_dir: &Path, host_id: &str) -> Self {
        let host_dir = state_dir.join(host_id);
        let run_dir = run_dir.join(host_id);
        HostPaths {
            data_root: host_dir.join("docker"),
            log: host_dir.join("dockerd.log"),
            config_file: host_dir.join("daemon.json"),
            etc_docker: host_dir.join("etc-docker"),
            resolv_conf: host_dir.join("resolv.conf"),
            // One letter: every byte counts below the exec root.
            exec_root: run_dir.join("x"),
            socket: run_dir.join("docker.sock"),
            pidfile: run_dir.join("dockerd.pid"),
            host_dir,
            run_dir,
        }
    }

    /// Fails if a socket below these paths would not fit sun_path.
    pub fn check_lengths(&self) -> Result<(), DockerdError> {
        let containerd = PathBuf::from(format!(
            "{}{CONTAINERD_SOCKET_SUFFIX}",
            self.exec_root.display()
        ));
        for p in [&self.socket, &containerd] {
            if p.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(DockerdError::PathTooLong(p.clone()));
            }
        }
        Ok(())
    }
}

/// How to start one dockerd.
#[derive(Debug, Clone)]
pub struct DockerdSpec {
    pub program: PathBuf,
    pub paths: HostPaths,
    /// `/run/netns/NAME` to enter, or `None` to stay in the agent's namespace.
    pub netns: Option<PathBuf>,
    /// cgroup parent of the containers (`berth-HOST_ID`), so clean-up finds them.
    pub cgroup_parent: String,
    /// Whether the network dockerd runs in is the host's own (it then
    /// manages iptables and forwarding there) or the machine's.
    pub network: HostNetwork,
    /// The resolver dockerd asks: the machine's, or a `resolv.conf` of the
    /// host's own ([`HostPaths::resolv_conf`]).
    pub dns: HostDns,
    /// The pool's registry mirror and registries (`daemon.json`, `certs.d`).
    pub registries: Registries,
}

impl DockerdSpec {
    /// dockerd's arguments. Only `-H unix://`: dockerd must never listen on
    /// TCP, the agent's front is the only way in. Every path is the
    /// machine's, also inside dockerd's own mount namespace, so that the
    /// clean-up recognises its processes by their command lines.
    pub fn dockerd_args(&self) -> Vec<String> {
        let p = &self.paths;
        let mut args = vec![
            format!("--config-file={}", p.config_file.display()),
            format!("--data-root={}", p.data_root.display()),
            format!("--exec-root={}", p.exec_root.display()),
            format!("--pidfile={}", p.pidfile.display()),
            format!("--host=unix://{}", p.socket.display()),
        ];
        args.extend(self.network.dockerd_args().map(str::to_owned));
        args.extend([
            format!("--cgroup-parent={}", self.cgroup_parent),
            "--shutdown-timeout=2".to_owned(),
        ]);
        args
    }

    /// A plain command line for tools that start a dockerd of this spec
    /// themselves (the benchmarks' comparison daemon): the network namespace
    /// through `nsenter`, without the mount namespace [`DockerdSpec::spawn`]
    /// gives the agent's dockerd.
    pub fn command_line(&self) -> (PathBuf, Vec<String>) {
        let mut dockerd_args = self.dockerd_args();
        match &self.netns {
            // `ip netns exec` remounts /sys and hides the cgroup v1 mounts
            // dockerd needs; nsenter only switches the network namespace.
            Some(ns) => {
                let mut args = vec![format!("--net={}", ns.display()), "--".to_owned()];
                args.push(self.program.to_string_lossy().into_owned());
                args.append(&mut dockerd_args);
                (PathBuf::from("nsenter"), args)
            }
            None => (self.program.clone(), dockerd_args),
        }
    }

    /// What dockerd's own `/run` holds: its socket at `/run/docker.sock`,
    /// and the host's directories at their machine paths.
    pub fn run_view(&self) -> RunView {
        RunView {
            socket: self.paths.socket.clone(),
            host_dirs: vec![self.paths.run_dir.clone(), self.paths.host_dir.clone()],
            etc_docker: Some(self.paths.etc_docker.clone()),
            resolv_conf: match self.dns {
                HostDns::Machine => None,
                HostDns::OwnAddress(_) => Some(self.paths.resolv_conf.clone()),
            },
        }
    }

    /// Creates the directories, writes the host's daemon.json (only the
    /// registry mirrors, so a machine-wide /etc/docker/daemon.json cannot
    /// add TCP hosts or other surprises), its `/etc/docker` (`certs.d`
    /// for the pool's registries) and its `resolv.conf` if it has one, and
    /// starts dockerd in the host's
    /// namespaces with its output going to the log file.
    #[tracing::instrument(skip(self), fields(host_dir = %self.paths.host_dir.display()), err)]
    pub async fn spawn(&self) -> Result<Child, DockerdError> {
        let p = &self.paths;
        p.check_lengths()?;
        for dir in [&p.host_dir, &p.run_dir, &p.data_root, &p.exec_root] {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|source| DockerdError::Prepare {
                    path: dir.clone(),
                    source,
                })?;
        }
        tokio::fs::write(&p.config_file, self.registries.daemon_json())
            .await
            .map_err(|source| DockerdError::Prepare {
                path: p.config_file.clone(),
                source,
            })?;
        self.registries
            .write_certs(&p.etc_docker)
            .map_err(|source| DockerdError::Prepare {
                path: p.etc_docker.clone(),
                source,
            })?;
        if let Some(conf) = self.dns.resolv_conf() {
            tokio::fs::write(&p.resolv_conf, conf)
                .await
                .map_err(|source| DockerdError::Prepare {
                    path: p.resolv_conf.clone(),
                    source,
                })?;
        }
        let log = std::fs::File::create(&p.log).map_err(|source| DockerdError::Prepare {
            path: p.log.clone(),
            source,
        })?;
        let log_err = log.try_clone().map_err(|source| DockerdError::Prepare {
            path: p.log.clone(),
            source,
        })?;
        let args = self.dockerd_args();
        tracing::debug!(program = ?self.program, ?args, netns = ?self.netns, "starting dockerd");
        let mut cmd = Command::new(&self.program);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // If the agent drops the handle without stopping dockerd (boot
            // cancelled, a task aborted), dockerd must not outlive it.
            .kill_on_drop(true)
            // dockerd speaks sd_notify itself: given the agent's socket it
            // would report the agent's unit ready (or stopping) on its own.
            .env_remove(berth_runtime::systemd::CHILD_ENV[0])
            .env_remove(berth_runtime::systemd::CHILD_ENV[1])
            .env_remove(berth_runtime::systemd::CHILD_ENV[2])
            // The system bus reaches firewalld, which would apply the host's
            // rules to the machine (see `mountns::HIDDEN`).
            .env_remove("DBUS_SYSTEM_BUS_ADDRESS");
        Ok(mountns::spawn_in_host(cmd, self.netns.clone(), self.run_view()).await?)
    }
}

/// Polls `/_ping` every [`PING_INTERVAL`] until dockerd answers, fails if it
/// exits or `timeout` passes, then runs the `info` self-check.
pub async fn wait_ready(
    child: &mut Child,
    paths: &HostPaths,
    timeout: Duration,
) -> Result<(BollardDocker, DaemonInfo), DockerdError> {
    let docker = wait_ping(child, paths, timeout).await?;
    let info = self_check(&docker).await?;
    Ok((docker, info))
}

/// Polls `/_ping` every [`PING_INTERVAL`] until dockerd answers; fails if it
/// exits or `timeout` passes.
///
/// The client speaks [`DOCKER_API_VERSION`](crate::docker::client::DOCKER_API_VERSION),
/// which is in the ping's path: dockerd refuses a version above its own, so
/// an answer means it speaks ours, and asking `/version` to negotiate could
/// not lower it (that call costs dockerd a `runc --version` and a
/// `docker-init --version`).
pub async fn wait_ping(
    child: &mut Child,
    paths: &HostPaths,
    timeout: Duration,
) -> Result<BollardDocker, DockerdError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::from("socket not there yet");
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(DockerdError::ExitedEarly {
                status: status.to_string(),
                log_tail: log_tail(&paths.log),
            });
        }
        if paths.socket.exists() {
            match BollardDocker::new(&paths.socket) {
                Ok(docker) => match docker.ping().await {
                    Ok(()) => return Ok(docker),
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(DockerdError::NoPing {
                timeout,
                last,
                log_tail: log_tail(&paths.log),
            });
        }
        tokio::time::sleep(PING_INTERVAL).await;
    }
}

/// The `info` self-check: dockerd answers `info` and names its version.
pub async fn self_check(docker: &BollardDocker) -> Result<DaemonInfo, DockerdError> {
    let info = docker.info().await?;
    if info.server_version.is_empty() {
        return Err(DockerdError::SelfCheck(DockerError::NotFound {
            op: "info",
            target: "ServerVersion".to_owned(),
        }));
    }
    Ok(info)
}

/// Everything a dockerd of `spec` that answered its first `/_ping` must
/// pass before the host is offered:
///
/// - the host's network rules ([`hostnet::apply`]): dockerd made its chains
///   before it answered, and the rules go in after them;
/// - meanwhile, the `info` self-check ([`self_check`]), then the proof that
///   it listens on no TCP port ([`listeners::ensure_no_tcp`]): dockerd opens
///   every `-H` listener before it answers `/_ping`, so a TCP listener, if
///   any, is there by now. Checked once `info` has answered because right
///   after its first ping dockerd briefly holds a socket of another kind,
///   which sends the check to the TCP tables (milliseconds of CPU; see
///   [`listeners`]), and because the check is synchronous: nothing else of
///   the boot waits on it then.
///
/// The first failure fails the boot (the other part is dropped, its
/// process killed).
pub async fn checks(
    spec: &DockerdSpec,
    child: &Child,
    docker: &BollardDocker,
) -> Result<DaemonInfo, DockerdError> {
    let paths = &spec.paths;
    let t = std::time::Instant::now();
    let rules = async {
        hostnet::apply(spec.network, spec.netns.as_deref())
            .await
            .map_err(DockerdError::from)?;
        Ok::<_, DockerdError>(t.elapsed())
    };
    let daemon = async {
        let info = self_check(docker).await?;
        let info_took = t.elapsed();
        let pid = read_pid(&paths.pidfile)
            .or_else(|| child.id().and_then(|p| i32::try_from(p).ok()))
            .ok_or_else(|| DockerdError::NoPid(paths.pidfile.clone()))?;
        listeners::ensure_no_tcp(pid)?;
        Ok::<_, DockerdError>((info, pid, info_took, t.elapsed() - info_took))
    };
    // The rules' first process is under way before the `info` request.
    let (rules_took, (info, pid, info_took, no_tcp_took)) = tokio::try_join!(rules, daemon)?;
    tracing::info!(
        pid,
        info_ms = millis(info_took),
        no_tcp_ms = millis(no_tcp_took),
        rules_ms = millis(rules_took),
        "dockerd answers `info`, listens on no TCP port and has the host's network rules"
    );
    Ok(info)
}

/// A duration in milliseconds, to a tenth, for the boot's timing logs.
pub fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

/// Watches the child and resolves when it exits, with its status.
pub async fn wait_exit(mut child: Child) -> String {
    match child.wait().await {
        Ok(status) => describe(status),
        Err(e) => format!("wait failed: {e}"),
    }
}

fn describe(status: ExitStatus) -> String {
    status.to_string()
}

/// The last lines of dockerd's log, for error messages.
pub fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

/// The pid in dockerd's pidfile, if any.
pub fn read_pid(pidfile: &Path) -> Option<i32> {
    std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()
}

/// Whether the dockerd of these paths still runs (per its pidfile).
pub fn running(paths: &HostPaths) -> bool {
    read_pid(&paths.pidfile).is_some_and(cleanup::alive)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(netns: Option<&str>) -> DockerdSpec {
        DockerdSpec {
            program: PathBuf::from("dockerd"),
            paths: HostPaths::new(
                Path::new("/var/lib/berth/hosts"),
                Path::new("/run/berth"),
                "berth-1a2b",
            ),
            netns: netns.map(PathBuf::from),
            cgroup_parent: "berth-berth-1a2b".to_owned(),
            network: HostNetwork::Own,
            dns: HostDns::Machine,
            registries: Registries::default(),
        }
    }

    #[test]
    fn paths_layout() {
        let p = spec(None).paths;
        assert_eq!(
            p.data_root,
            PathBuf::from("/var/lib/berth/hosts/berth-1a2b/docker")
        );
        assert_eq!(
            p.log,
            PathBuf::from("/var/lib/berth/hosts/berth-1a2b/dockerd.log")
        );
        assert_eq!(p.exec_root, PathBuf::from("/run/berth/berth-1a2b/x"));
        assert_eq!(p.socket, PathBuf::from("/run/berth/berth-1a2b/docker.sock"));
        assert_eq!(
            p.pidfile,
            PathBuf::from("/run/berth/berth-1a2b/dockerd.pid")
        );
        assert!(p.check_lengths().is_ok());
        let long = HostPaths::new(
            Path::new("/s"),
            &Path::new("/run").join("r".repeat(80)),
            "berth-1a2b",
        );
        assert!(matches!(
            long.check_lengths(),
            Err(DockerdError::PathTooLong(_))
        ));
    }

    #[test]
    fn command_line_enters_netns_and_never_listens_on_tcp() {
        let spec = spec(Some("/run/netns/berth-1a2b"));
        let args = spec.dockerd_args();
        assert!(args[0].starts_with("--config-file="));
        assert!(args.contains(&"--host=unix:///run/berth/berth-1a2b/docker.sock".to_owned()));
        assert!(args.contains(&"--exec-root=/run/berth/berth-1a2b/x".to_owned()));
        assert!(args.contains(&"--cgroup-parent=berth-berth-1a2b".to_owned()));
        let hosts: Vec<&String> = args
            .iter()
            .filter(|a| a.starts_with("--host") || a.starts_with("-H"))
            .collect();
        assert_eq!(hosts.len(), 1);
        assert!(!args.iter().any(|a| a.contains("tcp://")));

        let (prog, line) = spec.command_line();
        assert_eq!(prog, PathBuf::from("nsenter"));
        assert_eq!(&line[..3], ["--net=/run/netns/berth-1a2b", "--", "dockerd"]);
        assert_eq!(&line[3..], &args[..]);
        let (prog, line) = self::spec(None).command_line();
        assert_eq!(prog, PathBuf::from("dockerd"));
        assert_eq!(line, args);
    }

    #[test]
    fn iptables_and_forwarding_follow_whose_network_it_is() {
        let mut s = spec(Some("/run/netns/berth-1a2b"));
        let own = s.dockerd_args();
        for flag in ["--iptables=true", "--ip-masq=true", "--ip-forward=true"] {
            assert!(own.contains(&flag.to_owned()), "{flag} in {own:?}");
        }
        s.network = HostNetwork::Shared;
        let shared = s.dockerd_args();
        for flag in ["--iptables=false", "--ip-masq=false", "--ip-forward=false"] {
            assert!(shared.contains(&flag.to_owned()), "{flag} in {shared:?}");
        }
    }

    #[test]
    fn the_run_view_links_the_socket_and_keeps_the_hosts_dirs() {
        let v = spec(None).run_view();
        assert_eq!(v.socket, PathBuf::from("/run/berth/berth-1a2b/docker.sock"));
        assert_eq!(
            v.host_dirs,
            [
                PathBuf::from("/run/berth/berth-1a2b"),
                PathBuf::from("/var/lib/berth/hosts/berth-1a2b")
            ]
        );
        assert_eq!(v.resolv_conf, None, "the machine's resolver");
        let own = DockerdSpec {
            dns: HostDns::OwnAddress("198.18.0.6".parse().unwrap()),
            ..spec(Some("/run/netns/berth-1a2b"))
        };
        assert_eq!(
            own.run_view().resolv_conf,
            Some(PathBuf::from("/var/lib/berth/hosts/berth-1a2b/resolv.conf"))
        );
    }

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let f = std::env::temp_dir().join(format!("berth-logtail-{}", std::process::id()));
        let text: String = (0..50).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&f, text).unwrap();
        let tail = log_tail(&f);
        std::fs::remove_file(&f).unwrap();
        assert!(
            tail.starts_with("line 30\n") && tail.ends_with("line 49"),
            "{tail}"
        );
        assert_eq!(log_tail(Path::new("/nonexistent/berth.log")), "");
    }
}
