//! Destroying what a local host leaves on the machine: processes (dockerd,
//! containerd, shims, docker-proxy, container processes), mounts, cgroups,
//! the network namespace and veth, and the directories. Used in two ways:
//! [`destroy`] for one host at the end of its life (scope built from its
//! known names), and [`sweep`] for whatever killed runs left behind (scope
//! found by prefix).
//!
//! Everything is matched by name or path prefix; a [`Scope`] never reaches
//! beyond its own prefix, roots and namespaces, and the current process is
//! never signalled. A host's dockerd keeps its own mounts (overlays, its
//! namespace handle) in a mount namespace of its own (`docker::mountns`):
//! they are never on the machine, and they go when the last process in that
//! namespace is killed here; unmounting below the host's directories is for
//! anything else that put a mount there.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::provider::netns;

/// Bound on waiting for killed processes to disappear.
pub const KILL_WAIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on removing one cgroup tree (rmdir fails while tasks exit).
pub const CGROUP_RMDIR_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on removing a host's directories (data roots can hold many files).
pub const REMOVE_DIR_TIMEOUT: Duration = Duration::from_secs(60);
/// Passes over the scope's processes, each killing what the last one missed
/// (children forked meanwhile).
const KILL_PASSES: usize = 5;
/// How often to look again while waiting for processes or cgroups.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// cgroup v1 hierarchies (and the unified one) are mounted here.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Executables dockerd runs; only these are killed for mentioning a root
/// (processes inside a swept namespace or cgroup are killed whatever they are).
const DOCKER_FAMILY: [&str; 6] = [
    "dockerd",
    "containerd",
    "containerd-shim",
    "containerd-shim-runc-v2",
    "docker-proxy",
    "runc",
];

/// What destroying left undone.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error("processes still alive after SIGKILL: {0:?}")]
    Survivors(Vec<i32>),
    #[error("mounts left under the host's directories: {0:?}")]
    Mounts(Vec<PathBuf>),
    #[error("cgroup {path:?} could not be removed: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("removing {path:?}: {source}")]
    RemoveDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("removing {0:?} timed out")]
    RemoveDirTimeout(PathBuf),
    #[error("reading {path:?}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Everything one clean-up may touch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// Path prefixes (plain strings, so `ROOT/berth-` covers every host of a
    /// prefix): processes of the docker family mentioning one are killed,
    /// mounts under one are unmounted.
    pub path_prefixes: Vec<String>,
    /// Network namespaces to empty (every process inside is killed) and delete.
    pub netns: Vec<String>,
    /// Root-side veths to delete.
    pub veths: Vec<String>,
    /// cgroup directory names (under every hierarchy) to empty and remove.
    pub cgroups: Vec<String>,
    /// Directories to delete.
    pub dirs: Vec<PathBuf>,
}

/// What a clean-up did, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CleanupReport {
    pub killed: usize,
    pub unmounted: usize,
    pub cgroups_removed: usize,
    pub netns_deleted: usize,
    pub dirs_removed: usize,
}

/// The cgroup parent of a host's containers.
pub fn cgroup_name(host_id: &str) -> String {
    format!("berth-{host_id}")
}

/// The textual prefixes that stand for `dir/tail*`: as given (normalised:
/// no `.` or doubled or trailing slashes) and, if different, with symlinks
/// resolved, because mountinfo shows resolved paths (`/var/run` is `/run`)
/// while command lines show what was passed.
pub fn path_prefixes(dir: &Path, tail: &str) -> Vec<String> {
    let render = |p: &Path| {
        let normal: PathBuf = p.components().collect();
        format!("{}/{tail}", normal.to_string_lossy().trim_end_matches('/'))
    };
    let mut out = vec![render(dir)];
    if let Ok(real) = std::fs::canonicalize(dir) {
        let real = render(&real);
        if !out.contains(&real) {
            out.push(real);
        }
    }
    out
}

/// Removes leftovers of earlier, killed runs: everything under
/// `state_root/prefix*` and `run_root/prefix*`, namespaces `prefix*` and
/// their veths, cgroups `berth-prefix*`. Safe to call when nothing is left.
#[tracing::instrument(err)]
pub async fn sweep(
    state_root: &Path,
    run_root: &Path,
    prefix: &str,
) -> Result<CleanupReport, CleanupError> {
    crate::config::validate_prefix(prefix).map_err(|e| CleanupError::Read {
        path: PathBuf::from(prefix),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()),
    })?;
    let mut prefixes = path_prefixes(state_root, prefix);
    prefixes.extend(path_prefixes(run_root, prefix));
    let mut scope = Scope {
        path_prefixes: prefixes,
        ..Scope::default()
    };
    for name in list_names(Path::new(netns::NETNS_DIR), prefix) {
        if let Some(block) = netns::block_of(prefix, &name) {
            scope.veths.push(netns::veth_name(block));
        }
        scope.netns.push(name);
    }
    let cgroup_prefix = cgroup_name(prefix);
    let mut cgroups = BTreeSet::new();
    for hierarchy in list_dirs(Path::new(CGROUP_ROOT)) {
        cgroups.extend(list_names(&hierarchy, &cgroup_prefix));
    }
    scope.cgroups = cgroups.into_iter().collect();
    for root in [state_root, run_root] {
        for name in list_names(root, prefix) {
            scope.dirs.push(root.join(name));
        }
    }
    let report = destroy(&scope).await?;
    if report != CleanupReport::default() {
        tracing::info!(?report, %prefix, "swept leftovers");
    }
    Ok(report)
}

/// Destroys everything in `scope`, in the order that lets each step succeed:
/// processes (they hold mounts, cgroups and namespaces), cgroups, mounts,
/// namespaces and veths, directories.
pub async fn destroy(scope: &Scope) -> Result<CleanupReport, CleanupError> {
    let (mut report, mut first_error) = empty(scope).await;

    // Deleting a namespace destroys its veth pair too; the veths are deleted
    // on their own for namespaces that were never (fully) created.
    for name in &scope.netns {
        if netns::delete_netns(name).await {
            report.netns_deleted += 1;
        }
    }
    for veth in &scope.veths {
        netns::delete_veth(veth).await;
    }

    for dir in &scope.dirs {
        match remove_dir(dir).await {
            Ok(true) => report.dirs_removed += 1,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "removing directory");
                first_error.get_or_insert(e);
            }
        }
    }

    match first_error {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

/// The first steps of [`destroy`], which leave the namespace, the veths
/// and the directories in place: every process of the scope is killed
/// (docker family mentioning a prefix, anything inside one of the
/// namespaces or cgroups, and anything that shares a mount or PID namespace
/// with one of those, other than the agent's own), the cgroups are removed
/// and whatever is mounted under the prefixes is unmounted. Returns what it
/// did and the first error.
pub async fn empty(scope: &Scope) -> (CleanupReport, Option<CleanupError>) {
    let mut report = CleanupReport::default();
    let netns_inodes: Vec<u64> = scope
        .netns
        .iter()
        .filter_map(|n| {
            std::fs::metadata(netns::netns_path(n))
                .ok()
                .map(|m| m.ino())
        })
        .collect();

    let mut first_error: Option<CleanupError> = None;
    // A process may fork while its siblings are killed; look again until a
    // pass finds nobody alive.
    let mut victims: Vec<i32> = vec![];
    for _ in 0..KILL_PASSES {
        let mut found = matching_processes(&scope.path_prefixes, &netns_inodes);
        for name in &scope.cgroups {
            found.extend(cgroup_members(name));
        }
        found.extend(namespace_sharers(&found));
        found = with_descendants(found);
        found.sort_unstable();
        found.dedup();
        found.retain(|p| alive(*p));
        if found.is_empty() {
            break;
        }
        report.killed += kill_all(&found);
        victims.extend(found);
    }
    victims.sort_unstable();
    victims.dedup();
    if let Err(e) = wait_gone(&victims).await {
        first_error.get_or_insert(e);
    }

    for name in &scope.cgroups {
        match remove_cgroup(name).await {
            Ok((killed, removed)) => {
                report.killed += killed;
                report.cgroups_removed += removed;
            }
            Err(e) => {
                tracing::warn!(error = %e, "removing cgroup");
                first_error.get_or_insert(e);
            }
        }
    }

    match unmount_under(&scope.path_prefixes) {
        Ok(n) => report.unmounted += n,
        Err(e) => {
            tracing::warn!(error = %e, "unmounting");
            first_error.get_or_insert(e);
        }
    }
    (report, first_error)
}

/// Pids in cgroup `name` and below, in every hierarchy.
fn cgroup_members(name: &str) -> Vec<i32> {
    let mut dirs = vec![];
    for hierarchy in list_dirs(Path::new(CGROUP_ROOT)) {
        let top = hierarchy.join(name);
        if top.is_dir() {
            collect_dirs(&top, &mut dirs);
        }
    }
    dirs.iter()
        .flat_map(|d| {
            std::fs::read_to_string(d.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// `pids` and every process below one of them (by parent pid), found
/// before anything is killed: an orphan is handed to the nearest subreaper
/// (containerd's shim, for a container's processes) and would be lost to
/// this search once that died.
fn with_descendants(pids: Vec<i32>) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    let me = i32::try_from(std::process::id()).unwrap_or(0);
    let mut children: std::collections::BTreeMap<i32, Vec<i32>> = Default::default();
    for e in entries.filter_map(|e| e.ok()) {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if let Some(ppid) = ppid {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut seen: BTreeSet<i32> = pids.iter().copied().collect();
    let mut todo = pids;
    while let Some(pid) = todo.pop() {
        for &c in children.get(&pid).map(Vec::as_slice).unwrap_or_default() {
            if c != me && seen.insert(c) {
                todo.push(c);
            }
        }
    }
    seen.into_iter().collect()
}

/// Namespaces whose members die with `pids`: their mount and PID
/// namespaces, except the agent's own.
const SHARED_NAMESPACES: [&str; 2] = ["mnt", "pid"];

/// Processes (other than the agent) that share a mount or PID namespace
/// with one of `pids`, unless it is the agent's own or the machine's: a process that moved
/// itself out of its container's cgroup still lives in the container's
/// namespaces.
fn namespace_sharers(pids: &[i32]) -> Vec<i32> {
    let ns_of = |dir: &Path, kind: &str| {
        std::fs::metadata(dir.join("ns").join(kind))
            .ok()
            .map(|m| (m.dev(), m.ino()))
    };
    // The agent's and the machine's (pid 1's) namespaces are never marked.
    let own: Vec<(u64, u64)> = [Path::new("/proc/self"), Path::new("/proc/1")]
        .iter()
        .flat_map(|dir| SHARED_NAMESPACES.iter().filter_map(|k| ns_of(dir, k)))
        .collect();
    let mut marked: BTreeSet<(u64, u64)> = BTreeSet::new();
    for pid in pids {
        let dir = PathBuf::from(format!("/proc/{pid}"));
        for kind in SHARED_NAMESPACES {
            if let Some(ns) = ns_of(&dir, kind).filter(|ns| !own.contains(ns)) {
                marked.insert(ns);
            }
        }
    }
    if marked.is_empty() {
        return vec![];
    }
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            if pid == me {
                return None;
            }
            let dir = e.path();
            SHARED_NAMESPACES
                .iter()
                .any(|k| ns_of(&dir, k).is_some_and(|ns| marked.contains(&ns)))
                .then(|| i32::try_from(pid).ok())
                .flatten()
        })
        .collect()
}

/// Names in `dir` starting with `prefix` (none if `dir` is missing).
fn list_names(dir: &Path, prefix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

fn list_dirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .map(|e| e.path())
        .collect()
}

/// Pids to kill: docker-family processes whose command line mentions one of
/// the prefixes, and any process inside one of the namespaces.
fn matching_processes(prefixes: &[String], netns_inodes: &[u64]) -> Vec<i32> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    let mut pids = vec![];
    for entry in entries.filter_map(|e| e.ok()) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let dir = entry.path();
        let in_netns = !netns_inodes.is_empty()
            && std::fs::metadata(dir.join("ns/net"))
                .map(|m| netns_inodes.contains(&m.ino()))
                .unwrap_or(false);
        let mentions = !prefixes.is_empty()
            && std::fs::read(dir.join("cmdline"))
                .map(|raw| cmdline_matches(&raw, prefixes))
                .unwrap_or(false);
        if in_netns || mentions {
            if let Ok(pid) = i32::try_from(pid) {
                pids.push(pid);
            }
        }
    }
    pids
}

/// Whether a NUL-separated command line is a docker-family process that
/// mentions one of `prefixes`.
pub fn cmdline_matches(raw: &[u8], prefixes: &[String]) -> bool {
    let mut args = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(String::from_utf8_lossy);
    let Some(argv0) = args.next() else {
        return false;
    };
    let exe = argv0.rsplit('/').next().unwrap_or_default();
    if !DOCKER_FAMILY.contains(&exe) {
        return false;
    }
    args.any(|a| prefixes.iter().any(|p| a.contains(p.as_str())))
}

fn kill_all(pids: &[i32]) -> usize {
    pids.iter()
        .filter(|pid| kill(Pid::from_raw(**pid), Signal::SIGKILL).is_ok())
        .count()
}

/// Whether `pid` still runs. A zombie has finished: only its parent's wait
/// is missing, and it holds no mounts, namespaces or cgroups.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the `(comm)` field, which may hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .map(|state| state != 'Z' && state != 'X')
            .unwrap_or(false),
        Err(_) => false,
    }
}

async fn wait_gone(pids: &[i32]) -> Result<(), CleanupError> {
    let deadline = tokio::time::Instant::now() + KILL_WAIT_TIMEOUT;
    loop {
        let left: Vec<i32> = pids.iter().copied().filter(|p| alive(*p)).collect();
        if left.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(CleanupError::Survivors(left));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Empties and removes cgroup `name` in every hierarchy, deepest first.
/// Returns (pids killed, directories removed).
async fn remove_cgroup(name: &str) -> Result<(usize, usize), CleanupError> {
    let mut dirs = vec![];
    for hierarchy in list_dirs(Path::new(CGROUP_ROOT)) {
        let top = hierarchy.join(name);
        if top.is_dir() {
            collect_dirs(&top, &mut dirs);
        }
    }
    // Deepest first: a cgroup with children cannot be removed.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    let mut killed = 0;
    let mut removed = 0;
    for dir in dirs {
        let deadline = tokio::time::Instant::now() + CGROUP_RMDIR_TIMEOUT;
        loop {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            let pids: Vec<i32> = procs
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect();
            killed += kill_all(&pids);
            match std::fs::remove_dir(&dir) {
                Ok(()) => {
                    removed += 1;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                // EBUSY while killed tasks are still exiting.
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(CleanupError::Cgroup {
                        path: dir,
                        source: e,
                    });
                }
                Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
            }
        }
    }
    Ok((killed, removed))
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    for child in list_dirs(dir) {
        collect_dirs(&child, out);
    }
    out.push(dir.to_owned());
}

/// Mount points listed in mountinfo text, in order of appearance (a mount
/// on top of another comes later).
pub fn parse_mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mount_field(field)))
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mount_field(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let oct = &bytes[i + 1..i + 4];
            if oct.iter().all(|b| (b'0'..=b'7').contains(b)) {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points under one of `prefixes`, innermost (latest) first.
pub fn mounts_to_unmount(mountinfo: &str, prefixes: &[String]) -> Vec<PathBuf> {
    let mut points: Vec<PathBuf> = parse_mount_points(mountinfo)
        .into_iter()
        .filter(|p| {
            let s = p.to_string_lossy();
            prefixes.iter().any(|pre| s.starts_with(pre.as_str()))
        })
        .collect();
    points.reverse();
    points
}

/// Lazily unmounts everything under the prefixes; returns how many.
fn unmount_under(prefixes: &[String]) -> Result<usize, CleanupError> {
    if prefixes.is_empty() {
        return Ok(0);
    }
    let path = PathBuf::from("/proc/self/mountinfo");
    let mut count = 0;
    // Stacked mounts reappear after the top one goes; a few passes settle it.
    for _ in 0..4 {
        let info = std::fs::read_to_string(&path).map_err(|source| CleanupError::Read {
            path: path.clone(),
            source,
        })?;
        let points = mounts_to_unmount(&info, prefixes);
        if points.is_empty() {
            return Ok(count);
        }
        for p in &points {
            // MNT_DETACH: a busy mount (a process we could not kill yet) is
            // still detached from the tree, so the directory can go.
            match nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH) {
                Ok(()) => count += 1,
                Err(e) => tracing::debug!(mount = %p.display(), error = %e, "unmount"),
            }
        }
    }
    let info = std::fs::read_to_string(&path).map_err(|source| CleanupError::Read {
        path: path.clone(),
        source,
    })?;
    let left = mounts_to_unmount(&info, prefixes);
    if left.is_empty() {
        Ok(count)
    } else {
        Err(CleanupError::Mounts(left))
    }
}

/// Removes a directory tree; `Ok(false)` if it was not there.
pub async fn remove_dir(dir: &Path) -> Result<bool, CleanupError> {
    let owned = dir.to_owned();
    let job = tokio::task::spawn_blocking(move || remove_tree(&owned));
    match tokio::time::timeout(REMOVE_DIR_TIMEOUT, job).await {
        Ok(Ok(r)) => r,
        Ok(Err(join)) => Err(CleanupError::RemoveDir {
            path: dir.to_owned(),
            source: std::io::Error::other(join.to_string()),
        }),
        Err(_) => Err(CleanupError::RemoveDirTimeout(dir.to_owned())),
    }
}

/// `remove_dir_all` (which never follows a symlink), and once more after
/// clearing the immutable and append-only attributes below `dir` when the
/// first try was refused: a lease holder is root and may have set them
/// (`chattr +i`) on files in a volume.
fn remove_tree(dir: &Path) -> Result<bool, CleanupError> {
    let fail = |source| CleanupError::RemoveDir {
        path: dir.to_owned(),
        source,
    };
    match std::fs::remove_dir_all(dir) {
        Ok(()) => return Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            tracing::info!(dir = %dir.display(), error = %e, "clearing immutable attributes to remove a tree");
        }
        Err(e) => return Err(fail(e)),
    }
    clear_attributes(dir);
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(fail(e)),
    }
}

/// `chattr -R -f -i -a DIR` (e2fsprogs): recursive, skips symlinks.
pub fn clear_attributes(dir: &Path) {
    match std::process::Command::new("chattr")
        .args(["-R", "-f", "-i", "-a"])
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
    {
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "running chattr"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:26 / /run rw shared:5 - tmpfs tmpfs rw
101 30 0:4 net:[4026532300] /run/berth/bta-1a2b/x/netns/default rw shared:5 - nsfs nsfs rw
102 22 0:50 / /var/lib/berth/hosts/bta-1a2b/docker/overlay2/abc/merged rw - overlay overlay rw
103 22 0:51 / /var/lib/berth/hosts/bta-1a2bc/docker rw - ext4 /dev/vdb rw
104 22 0:52 / /var/lib/berth/hosts/other-0001/docker rw - ext4 /dev/vdb rw
105 22 0:53 / /tmp/with\\040space rw - tmpfs tmpfs rw
";

    #[test]
    fn mountinfo_parsing_unescapes() {
        let points = parse_mount_points(MOUNTINFO);
        assert_eq!(points.len(), 7);
        assert_eq!(points[6], PathBuf::from("/tmp/with space"));
    }

    #[test]
    fn unmounts_only_own_prefix_innermost_first() {
        let host = vec![
            "/run/berth/bta-1a2b/".to_owned(),
            "/var/lib/berth/hosts/bta-1a2b/".to_owned(),
        ];
        assert_eq!(
            mounts_to_unmount(MOUNTINFO, &host),
            vec![
                PathBuf::from("/var/lib/berth/hosts/bta-1a2b/docker/overlay2/abc/merged"),
                PathBuf::from("/run/berth/bta-1a2b/x/netns/default"),
            ],
            "host scope must not reach bta-1a2bc"
        );
        let sweep = vec!["/var/lib/berth/hosts/bta-".to_owned()];
        assert_eq!(
            mounts_to_unmount(MOUNTINFO, &sweep),
            vec![
                PathBuf::from("/var/lib/berth/hosts/bta-1a2bc/docker"),
                PathBuf::from("/var/lib/berth/hosts/bta-1a2b/docker/overlay2/abc/merged"),
            ]
        );
    }

    #[test]
    fn only_docker_family_mentioning_a_prefix_matches() {
        let p = vec!["/run/berth/bta-".to_owned()];
        let cl = |args: &[&str]| args.join("\0").into_bytes();
        assert!(cmdline_matches(
            &cl(&["dockerd", "--exec-root", "/run/berth/bta-1a2b/x"]),
            &p
        ));
        assert!(cmdline_matches(
            &cl(&[
                "/usr/bin/containerd-shim-runc-v2",
                "-address",
                "/run/berth/bta-1a2b/x/containerd/containerd.sock"
            ]),
            &p
        ));
        assert!(
            !cmdline_matches(
                &cl(&["dockerd", "--exec-root", "/run/berth/btb-1a2b/x"]),
                &p
            ),
            "other prefix"
        );
        assert!(
            !cmdline_matches(&cl(&["berth-agent", "--run-dir", "/run/berth/bta-x"]), &p),
            "not docker family"
        );
        assert!(!cmdline_matches(
            &cl(&["bash", "-c", "ls /run/berth/bta-1a2b"]),
            &p
        ));
        assert!(!cmdline_matches(b"", &p));
    }

    #[test]
    fn zombies_and_missing_pids_are_not_alive() {
        assert!(alive(i32::try_from(std::process::id()).unwrap()));
        assert!(!alive(i32::MAX));
    }

    #[test]
    fn path_prefixes_are_normalised_and_resolved() {
        assert_eq!(
            path_prefixes(Path::new("/nonexistent/berth/"), "bta-"),
            vec!["/nonexistent/berth/bta-"]
        );
        assert_eq!(
            path_prefixes(Path::new("/nonexistent/./berth"), ""),
            vec!["/nonexistent/berth/"]
        );
        assert_eq!(path_prefixes(Path::new("/"), "bta-"), vec!["/bta-"]);
        // A symlinked directory is matched both ways.
        let base = std::env::temp_dir().join(format!("berth-prefix-test-{}", std::process::id()));
        std::fs::create_dir_all(base.join("real")).unwrap();
        let link = base.join("link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(base.join("real"), &link).unwrap();
        let got = path_prefixes(&link, "h/");
        std::fs::remove_dir_all(&base).unwrap();
        let real = std::fs::canonicalize(std::env::temp_dir())
            .unwrap()
            .join(format!("berth-prefix-test-{}", std::process::id()));
        assert_eq!(
            got,
            vec![
                format!("{}/h/", link.display()),
                format!("{}/real/h/", real.display())
            ]
        );
    }

    #[test]
    fn cgroup_names_carry_the_prefix() {
        assert_eq!(cgroup_name("bta-1a2b"), "berth-bta-1a2b");
        assert!(cgroup_name("bta-1a2b").starts_with(&cgroup_name("bta-")));
    }

    #[tokio::test]
    async fn destroy_of_an_empty_scope_does_nothing() {
        assert_eq!(
            destroy(&Scope::default()).await.unwrap(),
            CleanupReport::default()
        );
    }

    #[tokio::test]
    async fn destroy_removes_listed_directories() {
        let base = std::env::temp_dir().join(format!("berth-cleanup-test-{}", std::process::id()));
        std::fs::create_dir_all(base.join("a/b")).unwrap();
        std::fs::write(base.join("a/b/f"), b"x").unwrap();
        let scope = Scope {
            dirs: vec![base.clone(), base.join("missing")],
            ..Scope::default()
        };
        let r = destroy(&scope).await.unwrap();
        assert_eq!(r.dirs_removed, 1);
        assert!(!base.exists());
    }
}
