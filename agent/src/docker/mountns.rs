//! dockerd's own mount namespace, where `/var/run/docker.sock` is the host's
//! dockerd, as on any Docker host: a container started with `-v
//! /var/run/docker.sock:/var/run/docker.sock` (Testcontainers' Ryuk, a
//! docker-in-docker build, compose files written for a local Docker)
//! reaches its own host. Bind sources are resolved by dockerd and runc in
//! dockerd's mount namespace, so that is the only place the path has to
//! exist; on the machine nothing is created at `/var/run/docker.sock`.
//!
//! [`spawn_in_host`] starts a program (dockerd) from a dedicated thread
//! that first enters the host's network namespace (`setns`), then makes a
//! mount namespace of its own (`unshare(CLONE_NEWNS)`, mounts made slaves
//! so nothing propagates back to the machine) whose `/run` (where
//! `/var/run` points) is a fresh tmpfs holding:
//!
//! - `docker.sock`: a symlink to the host's socket (`RUN_DIR/HOST_ID/
//!   docker.sock`), which dockerd listens on at its machine path;
//! - the host's own directories, if they are under `/run`, bind-mounted at
//!   their machine paths: dockerd's command line, pidfile, exec root and
//!   containerd's sockets keep the paths the agent, `stop_dockerd` and the
//!   clean-up know, and other hosts' run directories stay out of sight;
//! - every other top-level entry of the machine's `/run`, bind-mounted back
//!   (not recursively: no copies of other mounts, such as other hosts'
//!   namespace handles, are kept alive by this namespace), so that e.g. a
//!   `/etc/resolv.conf` pointing into `/run/systemd/resolve` still works;
//!   except [`HIDDEN`], which a host's dockerd must not see (each with its
//!   reason there).
//!
//! and whose `/etc/docker` is the host's own directory (`HOST_DIR/
//! etc-docker`, see [`registries`](crate::docker::registries)): the
//! `certs.d` dockerd trusts the pool's registries through, and its
//! `key.json`; the machine's `/etc/docker` stays out of its sight. A host
//! with a resolver of its own (a local host in its own network namespace,
//! see [`hostnet`](crate::provider::hostnet) rule 3) also gets its
//! `HOST_DIR/resolv.conf` bound over `/etc/resolv.conf` (over the file it
//! links to, if it is a link): what dockerd and the containers it starts
//! read, while the machine's file stays as it is.
//!
//! [`spawn_in_netns`] does the same with the network namespace only (the
//! host's `iptables` rules), where `nsenter --net` would cost a process.
//!
//! The thread ends right after the spawn: `setns` and `unshare` change only
//! the calling thread, whose namespaces the child inherits; no thread of
//! the agent is left in them (the tokio blocking pool reuses its threads,
//! so it is not used). The namespace lives as long as dockerd and its
//! children; when they are killed (the provider's clean-up) it and every
//! mount dockerd made inside it (overlays, its namespace handle) go away
//! with them, so none of those mounts is ever visible on the machine.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::fcntl::OFlag;
use nix::mount::MsFlags;
use nix::sched::CloneFlags;
use nix::sys::stat::Mode;
use tokio::process::{Child, Command};

/// Where `/var/run` points when it cannot be resolved.
pub const DEFAULT_RUN: &str = "/run";
/// dockerd's configuration directory: `certs.d`, `key.json`.
pub const ETC_DOCKER: &str = "/etc/docker";
/// The resolver configuration dockerd and its containers read.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";
/// The socket name clients and containers look for under `/var/run`.
pub const SOCKET_NAME: &str = "docker.sock";
/// Top-level entries of the machine's `/run` that a host's dockerd must not
/// see, with the reason for each.
pub const HIDDEN: &[(&str, &str)] = &[
    (
        "docker.sock",
        "the host's own socket is linked here instead of the machine's",
    ),
    (
        "docker",
        "a machine dockerd's runtime directory: legacy plugin sockets would be shared",
    ),
    (
        "containerd",
        "dockerd uses a machine containerd found here instead of its own; shims keep sockets here",
    ),
    (
        "runc",
        "runc's default state directory holds the machine's containers",
    ),
    (
        "dbus",
        "dockerd hands its iptables rules to firewalld over the system bus, which applies them to the machine",
    ),
    (
        "netns",
        "every host's namespace handle: a copy here would keep the others alive",
    ),
];

/// What went wrong preparing dockerd's namespaces or starting it.
#[derive(Debug, thiserror::Error)]
pub enum MountNsError {
    #[error("starting the namespace thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("the namespace thread died before it answered")]
    ThreadDied,
    #[error("entering the network namespace {path:?}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("making a mount namespace: {0}")]
    Unshare(#[source] nix::Error),
    #[error("{what} ({target:?}): {source}")]
    Mount {
        what: &'static str,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("preparing {path:?}: {source}")]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting {program:?}: {source}")]
    Spawn {
        program: OsString,
        #[source]
        source: std::io::Error,
    },
}

/// What dockerd's `/run` holds besides the bind-backs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunView {
    /// The host's dockerd socket at its machine path; `/run/docker.sock`
    /// links to it.
    pub socket: PathBuf,
    /// Directories dockerd must reach at their machine paths (the host's
    /// run and state directories); those under `/run` are bind-mounted.
    pub host_dirs: Vec<PathBuf>,
    /// The host's directory bound over `/etc/docker`, if any.
    pub etc_docker: Option<PathBuf>,
    /// The host's file bound over `/etc/resolv.conf`, if any.
    pub resolv_conf: Option<PathBuf>,
}

/// The kind of a top-level entry of the machine's `/run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    /// Any other non-symlink: file, socket, fifo, device.
    File,
    Symlink(PathBuf),
}

/// What to do with one top-level entry of the machine's `/run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Bind-mount the machine's entry back at the same name.
    Bind(String, EntryKind),
    /// Recreate the symlink with the same target.
    Link(String, PathBuf),
    /// Leave it out: one of [`HIDDEN`], or the parent of a host directory
    /// (which is bound on its own, without its siblings).
    Hide(String),
}

/// Decides, for each top-level entry of the machine's `run` directory, what
/// dockerd's `/run` gets; `host_dirs` are canonical paths.
pub fn plan(run: &Path, entries: &[(String, EntryKind)], host_dirs: &[PathBuf]) -> Vec<Action> {
    let host_tops: Vec<String> = host_dirs
        .iter()
        .filter_map(|d| top_level_under(run, d))
        .collect();
    let mut actions: Vec<Action> = entries
        .iter()
        .map(|(name, kind)| {
            if HIDDEN.iter().any(|(h, _)| h == name) || host_tops.contains(name) {
                Action::Hide(name.clone())
            } else {
                match kind {
                    EntryKind::Symlink(target) => Action::Link(name.clone(), target.clone()),
                    other => Action::Bind(name.clone(), other.clone()),
                }
            }
        })
        .collect();
    actions.sort_by(|a, b| name_of(a).cmp(name_of(b)));
    actions
}

fn name_of(a: &Action) -> &str {
    match a {
        Action::Bind(n, _) | Action::Link(n, _) | Action::Hide(n) => n,
    }
}

/// The first component of `path` below `run`, if `path` is below it.
fn top_level_under(run: &Path, path: &Path) -> Option<String> {
    match path.strip_prefix(run).ok()?.components().next()? {
        Component::Normal(name) => Some(name.to_string_lossy().into_owned()),
        _ => None,
    }
}

/// Starts `cmd` in the host's network namespace (`netns`; `None`: the
/// agent's own) and in a new mount namespace with `view` as its `/run`.
/// The child is spawned in a runtime context (the caller's), as any tokio
/// child.
pub async fn spawn_in_host(
    cmd: Command,
    netns: Option<PathBuf>,
    view: RunView,
) -> Result<Child, MountNsError> {
    on_own_thread(move || spawn_here(cmd, netns.as_deref(), &view)).await
}

/// Starts `cmd` in the network namespace `netns` only (the agent's mount
/// namespace, as `nsenter --net` would, without the extra process).
pub async fn spawn_in_netns(mut cmd: Command, netns: PathBuf) -> Result<Child, MountNsError> {
    on_own_thread(move || {
        enter_netns(&netns)?;
        let program = cmd.as_std().get_program().to_owned();
        cmd.spawn()
            .map_err(|source| MountNsError::Spawn { program, source })
    })
    .await
}

/// Runs `work` on a thread of its own that ends with it (whatever
/// namespaces it entered go with it), in the caller's runtime context.
async fn on_own_thread(
    work: impl FnOnce() -> Result<Child, MountNsError> + Send + 'static,
) -> Result<Child, MountNsError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let handle = tokio::runtime::Handle::current();
    std::thread::Builder::new()
        .name("berth-ns-spawn".to_owned())
        .spawn(move || {
            let _runtime = handle.enter();
            let _ = tx.send(work());
        })
        .map_err(MountNsError::Thread)?;
    rx.await.map_err(|_| MountNsError::ThreadDied)?
}

/// Moves the calling thread into the network namespace at `path`.
fn enter_netns(path: &Path) -> Result<(), MountNsError> {
    crate::provider::netns::enter(path).map_err(|source| MountNsError::Netns {
        path: path.to_owned(),
        source,
    })
}

/// The thread's work: namespaces, the `/run` view, the spawn.
fn spawn_here(
    mut cmd: Command,
    netns: Option<&Path>,
    view: &RunView,
) -> Result<Child, MountNsError> {
    if let Some(path) = netns {
        enter_netns(path)?;
    }
    nix::sched::unshare(CloneFlags::CLONE_NEWNS).map_err(MountNsError::Unshare)?;
    // On a machine whose mounts are shared (systemd), mounts made here would
    // otherwise appear on the machine; as slaves they still receive the
    // machine's own changes.
    mount(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        "making the mount namespace a slave of the machine's",
    )?;
    make_run_view(view)?;
    if let Some(dir) = &view.etc_docker {
        bind_etc_docker(dir)?;
    }
    if let Some(file) = &view.resolv_conf {
        bind_resolv_conf(file)?;
    }
    let program = cmd.as_std().get_program().to_owned();
    cmd.spawn()
        .map_err(|source| MountNsError::Spawn { program, source })
}

/// Replaces this thread's `/run` with the host's view of it.
fn make_run_view(view: &RunView) -> Result<(), MountNsError> {
    let run = std::fs::canonicalize("/var/run").unwrap_or_else(|_| PathBuf::from(DEFAULT_RUN));
    let host_dirs: Vec<PathBuf> = view
        .host_dirs
        .iter()
        .map(|d| std::fs::canonicalize(d).unwrap_or_else(|_| d.clone()))
        .collect();
    let entries = read_entries(&run)?;
    let actions = plan(&run, &entries, &host_dirs);

    // Handles on everything that is about to be covered by the tmpfs.
    let mut binds: Vec<(PathBuf, EntryKind, OwnedFd)> = vec![];
    for action in &actions {
        if let Action::Bind(name, kind) = action {
            let path = run.join(name);
            match open_path(&path) {
                Ok(fd) => binds.push((path, kind.clone(), fd)),
                // Gone since it was listed: nothing to bring back.
                Err(e) => tracing::debug!(path = %path.display(), error = %e, "not bound back"),
            }
        }
    }
    let mut own: Vec<(PathBuf, OwnedFd)> = vec![];
    for dir in host_dirs.iter().filter(|d| d.starts_with(&run)) {
        let fd = open_path(dir).map_err(|source| MountNsError::Prepare {
            path: dir.clone(),
            source,
        })?;
        own.push((dir.clone(), fd));
    }

    mount(
        Some(Path::new("tmpfs")),
        &run,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        "mounting dockerd's own /run",
    )?;
    set_mode(&run, 0o755)?;

    for (path, kind, fd) in &binds {
        let made = match kind {
            EntryKind::Dir => std::fs::create_dir(path),
            _ => std::fs::File::create(path).map(|_| ()),
        };
        let bound = made.map_err(|e| e.to_string()).and_then(|()| {
            bind_fd(fd, path, "binding a machine /run entry back").map_err(|e| e.to_string())
        });
        // One odd entry of the machine's /run is no reason to fail a host.
        if let Err(e) = bound {
            tracing::warn!(path = %path.display(), error = %e, "not bound back into dockerd's /run");
        }
    }
    for action in &actions {
        if let Action::Link(name, target) = action {
            let path = run.join(name);
            if let Err(e) = std::os::unix::fs::symlink(target, &path) {
                tracing::warn!(path = %path.display(), error = %e, "symlink not recreated in dockerd's /run");
            }
        }
    }
    for (dir, fd) in &own {
        std::fs::create_dir_all(dir).map_err(|source| MountNsError::Prepare {
            path: dir.clone(),
            source,
        })?;
        bind_fd(fd, dir, "binding the host's directory")?;
    }
    let link = run.join(SOCKET_NAME);
    std::os::unix::fs::symlink(&view.socket, &link)
        .map_err(|source| MountNsError::Prepare { path: link, source })?;
    Ok(())
}

/// Binds `dir` over `/etc/docker` (made on the machine if missing: an
/// empty directory, as dockerd itself would make it).
fn bind_etc_docker(dir: &Path) -> Result<(), MountNsError> {
    let target = Path::new(ETC_DOCKER);
    for d in [dir, target] {
        std::fs::create_dir_all(d).map_err(|source| MountNsError::Prepare {
            path: d.to_owned(),
            source,
        })?;
    }
    mount(
        Some(dir),
        target,
        None,
        MsFlags::MS_BIND,
        "binding the host's /etc/docker",
    )
}

/// Binds `file` over `/etc/resolv.conf`, or over what it links to (the
/// kernel follows the link; a target under `/run` is in this namespace's
/// own `/run` by now). A machine without the file (or with a dangling
/// link) is left as it is: nothing may be created in the machine's `/etc`,
/// and resolvers without a configuration ask the loopback address, which
/// refuses at once in the host's namespace too.
fn bind_resolv_conf(file: &Path) -> Result<(), MountNsError> {
    let target = Path::new(RESOLV_CONF);
    if !target.exists() {
        tracing::warn!(
            "the machine has no {RESOLV_CONF}: the host's resolver is the loopback address"
        );
        return Ok(());
    }
    mount(
        Some(file),
        target,
        None,
        MsFlags::MS_BIND,
        "binding the host's resolv.conf",
    )
}

/// The top-level entries of `run`, with their kinds.
fn read_entries(run: &Path) -> Result<Vec<(String, EntryKind)>, MountNsError> {
    let prepare = |source| MountNsError::Prepare {
        path: run.to_owned(),
        source,
    };
    let mut out = vec![];
    for entry in std::fs::read_dir(run).map_err(prepare)? {
        let entry = entry.map_err(prepare)?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let Ok(ty) = entry.file_type() else { continue };
        let kind = if ty.is_symlink() {
            match std::fs::read_link(entry.path()) {
                Ok(target) => EntryKind::Symlink(target),
                Err(_) => continue,
            }
        } else if ty.is_dir() {
            EntryKind::Dir
        } else {
            EntryKind::File
        };
        out.push((name, kind));
    }
    Ok(out)
}

/// An `O_PATH` handle: it names the file without opening it (a fifo does
/// not block, a device is not touched).
fn open_path(path: &Path) -> std::io::Result<OwnedFd> {
    nix::fcntl::open(
        path,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(std::io::Error::from)
}

/// Bind-mounts what `fd` names onto `target` (not recursively).
fn bind_fd(fd: &OwnedFd, target: &Path, what: &'static str) -> Result<(), MountNsError> {
    // The magic link reaches the file even though the tmpfs now covers it.
    let source = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    mount(Some(&source), target, None, MsFlags::MS_BIND, what)
}

fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    what: &'static str,
) -> Result<(), MountNsError> {
    nix::mount::mount(source, target, fstype, flags, None::<&str>).map_err(|source| {
        MountNsError::Mount {
            what,
            target: target.to_owned(),
            source,
        }
    })
}

fn set_mode(path: &Path, mode: u32) -> Result<(), MountNsError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        MountNsError::Prepare {
            path: path.to_owned(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries() -> Vec<(String, EntryKind)> {
        [
            ("berth", EntryKind::Dir),
            ("containerd", EntryKind::Dir),
            ("dbus", EntryKind::Dir),
            ("docker", EntryKind::Dir),
            ("docker.sock", EntryKind::File),
            ("initctl", EntryKind::File),
            ("lock", EntryKind::Dir),
            ("netns", EntryKind::Dir),
            ("runc", EntryKind::Dir),
            ("shm", EntryKind::Symlink(PathBuf::from("/dev/shm"))),
            ("systemd", EntryKind::Dir),
        ]
        .into_iter()
        .map(|(n, k)| (n.to_owned(), k))
        .collect()
    }

    #[test]
    fn the_machines_run_comes_back_except_what_a_host_must_not_see() {
        let host_dirs = [
            PathBuf::from("/run/berth/bta-1a2b"),
            PathBuf::from("/var/lib/berth/hosts/bta-1a2b"),
        ];
        let actions = plan(Path::new("/run"), &entries(), &host_dirs);
        let hidden: Vec<&str> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Hide(n) => Some(n.as_str()),
                _ => None,
            })
            .collect();
        // `berth` holds every host's run dir: only this host's is bound.
        assert_eq!(
            hidden,
            [
                "berth",
                "containerd",
                "dbus",
                "docker",
                "docker.sock",
                "netns",
                "runc"
            ]
        );
        assert!(actions.contains(&Action::Bind("systemd".into(), EntryKind::Dir)));
        assert!(actions.contains(&Action::Bind("initctl".into(), EntryKind::File)));
        assert!(actions.contains(&Action::Bind("lock".into(), EntryKind::Dir)));
        assert!(actions.contains(&Action::Link("shm".into(), "/dev/shm".into())));
        assert_eq!(actions.len(), entries().len(), "every entry decided once");
    }

    #[test]
    fn host_dirs_outside_run_hide_nothing() {
        let actions = plan(
            Path::new("/run"),
            &entries(),
            &[PathBuf::from("/tmp/berth-t/x/bta-1a2b")],
        );
        assert!(actions.contains(&Action::Bind("berth".into(), EntryKind::Dir)));
        assert_eq!(
            top_level_under(Path::new("/run"), Path::new("/run/berth-t/x/h")),
            Some("berth-t".to_owned())
        );
        assert_eq!(
            top_level_under(Path::new("/run"), Path::new("/running/x")),
            None
        );
        assert_eq!(top_level_under(Path::new("/run"), Path::new("/run")), None);
    }

    #[test]
    fn every_hidden_entry_says_why() {
        for (name, why) in HIDDEN {
            assert!(!name.contains('/'), "{name}: top-level names only");
            assert!(why.len() > 20, "{name}: {why}");
        }
    }
}
