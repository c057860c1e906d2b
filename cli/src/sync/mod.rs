//! `berth sync`: a local directory into a named volume on the leased host,
//! or (`--from`) a volume back into a local directory. What `-v $(pwd):/src`
//! would do on a local daemon, done through the Docker API the lease already
//! grants: no extra port, no SSH, nothing running on the host.
//!
//! How: a helper container is *created* (never started) with the volume
//! mounted at [`MOUNT_POINT`], and a tar stream goes into
//! `PUT /containers/{id}/archive` — dockerd itself extracts it into the
//! volume, as for `docker cp`. Copying back is `GET /containers/{id}/archive`.
//! The helper container is removed after each sync, also when it fails or
//! is interrupted.
//!
//! The helper image is an image with no files at all, imported by the CLI
//! on first use per lease (`POST /images/create?fromSrc=-` with an empty
//! tar): a container that never starts needs no binary, and nothing is
//! pulled. It is made per lease rather than baked into the host because the
//! agent's wipe removes every image and then verifies that nothing is left:
//! a baked image would need an exception in that verification, a hole the
//! security model does not want. Importing it costs a few milliseconds.
//!
//! The tar is written on a blocking thread while it is sent (the tree is
//! never held in memory or on disk): regular files, directories and
//! symlinks (never followed) with their modes, mtimes (seconds) and numeric
//! owners (or `--chown UID:GID`); hard links are sent as separate files;
//! sockets, FIFOs and devices are skipped with a warning. Excludes come from
//! `.berthignore` in the synced directory or `--exclude-from FILE`, plus
//! `--exclude PATTERN`, with `.dockerignore` semantics ([`ignore`]).
//! A sync adds and overwrites (a directory replaced by a file and the other
//! way round included); it deletes nothing: `docker volume rm NAME` first
//! for a clean copy. Copying back restores modes and mtimes, not owners
//! (files belong to whoever runs `berth`), and refuses any entry that would
//! land outside the destination, also through a symlink in the archive.

pub mod beneath;
pub mod ignore;

use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime};

use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountTypeEnum};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, DownloadFromContainerOptionsBuilder,
    RemoveContainerOptionsBuilder, UploadToContainerOptionsBuilder,
};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::lease_docker::{DOCKER_CALL_TIMEOUT, LeaseDockerError, LeaseEndpoint};
use berth_runtime::backoff::Backoff;

use crate::Exit;
use ignore::Excludes;

/// The exclude file read from the root of a synced directory.
pub const IGNORE_FILE: &str = ".berthignore";
/// The empty helper image (no files; containers of it are never started).
pub const HELPER_IMAGE_REPO: &str = "berth-sync-helper";
pub const HELPER_IMAGE_TAG: &str = "1";
/// Where the helper container mounts the volume.
pub const MOUNT_POINT: &str = "/berth-volume";
/// Label on helper containers, so an operator can tell what they are.
pub const HELPER_LABEL: &str = "berth.sync";
/// Default bound on one whole transfer (`--timeout`).
pub const DEFAULT_SYNC_TIMEOUT: &str = "30m";
/// Size of the chunks the tar stream is sent in.
const CHUNK: usize = 256 * 1024;
/// Chunks buffered between the tar writer and the connection.
const CHUNKS_IN_FLIGHT: usize = 8;
/// Attempts of a short, idempotent Docker call (image check, removal).
const CALL_ATTEMPTS: u32 = 3;
/// Ceiling of the first retry delay (see `berth_runtime::backoff`).
const RETRY_BASE: Duration = Duration::from_millis(200);

/// `berth sync` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct SyncArgs {
    /// The local directory: what goes into the volume, or with --from where
    /// the volume's content goes (created if missing).
    pub path: PathBuf,
    /// The named volume to copy PATH into (created if missing).
    #[arg(
        long,
        env = "BERTH_SYNC_VOLUME",
        required_unless_present = "from",
        conflicts_with = "from"
    )]
    pub volume: Option<String>,
    /// Copy back: the volume NAME, or NAME:SUBPATH for a part of it, into PATH.
    #[arg(long, env = "BERTH_SYNC_FROM", value_name = "NAME[:SUBPATH]")]
    pub from: Option<String>,
    /// Exclude file with .dockerignore syntax (default: PATH/.berthignore
    /// if there is one).
    #[arg(long, env = "BERTH_SYNC_EXCLUDE_FROM")]
    pub exclude_from: Option<PathBuf>,
    /// One more exclude pattern (repeatable), after those of the file.
    #[arg(long = "exclude", env = "BERTH_SYNC_EXCLUDE", value_name = "PATTERN")]
    pub excludes: Vec<String>,
    /// Owner written for every entry instead of the local one, UID:GID.
    #[arg(long, env = "BERTH_SYNC_CHOWN", value_name = "UID:GID")]
    pub chown: Option<String>,
    /// Bound on the whole transfer.
    #[arg(long, env = "BERTH_SYNC_TIMEOUT", default_value = DEFAULT_SYNC_TIMEOUT, value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// The lease's Docker API (berth acquire exports it).
    #[arg(long, env = "DOCKER_HOST")]
    pub docker_host: String,
    /// The lease's certificate directory (berth acquire exports it).
    #[arg(long, env = "DOCKER_CERT_PATH")]
    pub cert_dir: PathBuf,
}

/// What went wrong in a sync.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Endpoint(#[from] LeaseDockerError),
    /// A Docker call failed: with the daemon's answer (`status`, final) or
    /// without one (`status` None: the call may be retried).
    #[error("docker {op}: {reason}{}", status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
    Docker {
        op: &'static str,
        status: Option<u16>,
        reason: String,
    },
    #[error("docker {op} timed out after {timeout:?}")]
    Timeout { op: &'static str, timeout: Duration },
    #[error("{what}: {source}")]
    Local {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("there is no volume {0:?} on the leased host")]
    NoVolume(String),
    #[error("interrupted")]
    Interrupted,
}

impl SyncError {
    /// The CLI exit code (see `cli` for the table).
    pub fn exit_code(&self) -> Exit {
        match self {
            Self::Usage(_) => Exit::Usage,
            Self::Endpoint(LeaseDockerError::Certs { .. }) => Exit::NotAllowed,
            Self::Endpoint(LeaseDockerError::BadHost(_)) => Exit::Usage,
            Self::Docker { .. } | Self::Timeout { .. } | Self::Local { .. } => Exit::Failure,
            Self::NoVolume(_) => Exit::NotFound,
            Self::Interrupted => Exit::Interrupted,
        }
    }

    /// Whether another attempt may succeed: a Docker call that got no
    /// answer (connection, timeout), never one that dockerd refused.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Docker { status: None, .. })
    }

    fn local(what: impl Into<String>, source: io::Error) -> Self {
        Self::Local {
            what: what.into(),
            source,
        }
    }
}

fn docker_err(op: &'static str, e: bollard::errors::Error) -> SyncError {
    use bollard::errors::Error as E;
    let (status, reason) = match e {
        E::DockerResponseServerError {
            status_code,
            message,
        } => (Some(status_code), message),
        E::RequestTimeoutError => (None, "timed out".into()),
        other => (None, berth_runtime::error_chain(&other)),
    };
    SyncError::Docker { op, status, reason }
}

/// A byte stream of a tar archive.
pub type TarStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// The Docker operations a sync needs, so the flow (and that the helper
/// container always goes) is testable without dockerd.
pub trait VolumeArchive: Send + Sync {
    /// Whether the named volume exists (creating a helper container would
    /// create it, so copying back checks first).
    fn volume_exists(&self, volume: &str) -> impl Future<Output = Result<bool, SyncError>> + Send;
    /// Makes sure the empty helper image exists on the host.
    fn ensure_helper_image(&self) -> impl Future<Output = Result<(), SyncError>> + Send;
    /// Creates (never starts) a helper container mounting `volume` at
    /// [`MOUNT_POINT`]; returns its id.
    fn create_helper(&self, volume: &str)
    -> impl Future<Output = Result<String, SyncError>> + Send;
    /// Extracts the tar `body` at `path` inside the container.
    fn put_archive(
        &self,
        id: &str,
        path: &str,
        body: TarStream,
    ) -> impl Future<Output = Result<(), SyncError>> + Send;
    /// A tar of `path` inside the container (its top entry named after the
    /// last component of `path`).
    fn get_archive(&self, id: &str, path: &str) -> TarStream;
    fn remove_helper(&self, id: &str) -> impl Future<Output = Result<(), SyncError>> + Send;
}

/// [`VolumeArchive`] on the leased host, through bollard.
pub struct LeaseVolumes {
    /// Short calls.
    call: Docker,
    /// The transfer itself.
    transfer: Docker,
    transfer_timeout: Duration,
}

impl LeaseVolumes {
    pub fn new(endpoint: &LeaseEndpoint, transfer_timeout: Duration) -> Result<Self, SyncError> {
        Ok(Self {
            call: endpoint.docker(DOCKER_CALL_TIMEOUT)?,
            transfer: endpoint.docker(transfer_timeout)?,
            transfer_timeout,
        })
    }
}

/// Runs an idempotent call up to [`CALL_ATTEMPTS`] times, with jittered
/// backoff, retrying only failures that may be transient (no HTTP answer).
async fn retried<T, F, Fut>(mut f: F) -> Result<T, SyncError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, SyncError>>,
{
    let mut backoff = Backoff::new(RETRY_BASE, RETRY_BASE * 4);
    let mut attempt = 1;
    loop {
        match f().await {
            Err(e) if attempt < CALL_ATTEMPTS && e.is_transient() => {
                tracing::debug!(error = %e, attempt, "retrying");
                let delay = backoff.next_delay(&mut rand::rng());
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

fn helper_image() -> String {
    format!("{HELPER_IMAGE_REPO}:{HELPER_IMAGE_TAG}")
}

/// A tar archive with no entries: two zero blocks.
fn empty_tar() -> Bytes {
    Bytes::from_static(&[0u8; 1024])
}

impl VolumeArchive for LeaseVolumes {
    async fn volume_exists(&self, volume: &str) -> Result<bool, SyncError> {
        retried(|| async move {
            match self.call.inspect_volume(volume).await {
                Ok(_) => Ok(true),
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => Ok(false),
                Err(e) => Err(docker_err("inspect volume", e)),
            }
        })
        .await
    }

    async fn ensure_helper_image(&self) -> Result<(), SyncError> {
        let exists = retried(|| async move {
            match self.call.inspect_image(&helper_image()).await {
                Ok(_) => Ok(true),
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => Ok(false),
                Err(e) => Err(docker_err("inspect helper image", e)),
            }
        })
        .await?;
        if exists {
            return Ok(());
        }
        // Two concurrent syncs may both import: the second just re-tags, and
        // the untagged first image is removed by the wipe like any other.
        let opts = CreateImageOptionsBuilder::new()
            .from_src("-")
            .repo(HELPER_IMAGE_REPO)
            .tag(HELPER_IMAGE_TAG)
            .build();
        let mut progress =
            self.call
                .create_image(Some(opts), Some(bollard::body_full(empty_tar())), None);
        while let Some(item) = progress.next().await {
            let info = item.map_err(|e| docker_err("import helper image", e))?;
            if let Some(err) = info.error_detail.and_then(|d| d.message) {
                return Err(SyncError::Docker {
                    op: "import helper image",
                    status: None,
                    reason: err,
                });
            }
        }
        Ok(())
    }

    async fn create_helper(&self, volume: &str) -> Result<String, SyncError> {
        let name = format!("berth-sync-{}", uuid::Uuid::new_v4().simple());
        let body = ContainerCreateBody {
            image: Some(helper_image()),
            // Never run; dockerd still wants a command to create it.
            cmd: Some(vec!["/berth-sync-never-started".into()]),
            network_disabled: Some(true),
            labels: Some([(HELPER_LABEL.to_owned(), volume.to_owned())].into()),
            host_config: Some(HostConfig {
                mounts: Some(vec![Mount {
                    typ: Some(MountTypeEnum::VOLUME),
                    source: Some(volume.to_owned()),
                    target: Some(MOUNT_POINT.to_owned()),
                    ..Default::default()
                }]),
                network_mode: Some("none".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let opts = CreateContainerOptionsBuilder::new().name(&name).build();
        // Not retried: a lost answer would leave a second container. The
        // name is unique, so a retry is never needed for a name clash.
        let created = self
            .call
            .create_container(Some(opts), body)
            .await
            .map_err(|e| docker_err("create helper container", e))?;
        Ok(created.id)
    }

    async fn put_archive(&self, id: &str, path: &str, body: TarStream) -> Result<(), SyncError> {
        // The new tree wins: a directory in the volume may become a file
        // and the other way round (docker cp refuses that by default).
        let opts = UploadToContainerOptionsBuilder::new()
            .path(path)
            .no_overwrite_dir_non_dir("false")
            .build();
        match self
            .transfer
            .upload_to_container(id, Some(opts), bollard::body_try_stream(body))
            .await
        {
            Ok(()) => Ok(()),
            Err(bollard::errors::Error::RequestTimeoutError) => Err(SyncError::Timeout {
                op: "upload",
                timeout: self.transfer_timeout,
            }),
            Err(e) => Err(docker_err("upload", e)),
        }
    }

    fn get_archive(&self, id: &str, path: &str) -> TarStream {
        let opts = DownloadFromContainerOptionsBuilder::new()
            .path(path)
            .build();
        Box::pin(
            self.transfer
                .download_from_container(id, Some(opts))
                .map(|r| r.map_err(|e| io::Error::other(docker_err("download", e)))),
        )
    }

    async fn remove_helper(&self, id: &str) -> Result<(), SyncError> {
        let opts = RemoveContainerOptionsBuilder::new().force(true).build();
        retried(|| {
            let opts = opts.clone();
            async move {
                match self.call.remove_container(id, Some(opts)).await {
                    Ok(())
                    | Err(bollard::errors::Error::DockerResponseServerError {
                        status_code: 404,
                        ..
                    }) => Ok(()),
                    Err(e) => Err(docker_err("remove helper container", e)),
                }
            }
        })
        .await
    }
}

/// What one sync moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Regular files.
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Entries not sent (sockets, FIFOs, devices).
    pub skipped: u64,
    /// Bytes of file content.
    pub content_bytes: u64,
    /// Bytes of the tar stream on the wire.
    pub wire_bytes: u64,
}

/// Checks a volume name the way dockerd does (`[a-zA-Z0-9][a-zA-Z0-9_.-]+`).
pub fn check_volume_name(name: &str) -> Result<(), SyncError> {
    let mut chars = name.chars();
    let ok = name.len() >= 2
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(SyncError::Usage(format!(
            "invalid volume name {name:?}: use letters, digits, '_', '.', '-' (at least two characters, starting with a letter or digit)"
        )))
    }
}

/// Splits `NAME[:SUBPATH]` of `--from` and gives the path inside the helper
/// container. SUBPATH is relative to the volume and may not leave it.
pub fn parse_from(spec: &str) -> Result<(String, String), SyncError> {
    let (name, sub) = spec.split_once(':').unwrap_or((spec, ""));
    check_volume_name(name)?;
    let mut parts = Vec::new();
    for seg in sub.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                return Err(SyncError::Usage(format!(
                    "--from {spec:?}: the path inside the volume may not contain '..'"
                )));
            }
            s => parts.push(s),
        }
    }
    let mut path = MOUNT_POINT.to_owned();
    for p in parts {
        path.push('/');
        path.push_str(p);
    }
    Ok((name.to_owned(), path))
}

fn parse_chown(s: &str) -> Result<(u64, u64), SyncError> {
    let bad = || SyncError::Usage(format!("--chown {s:?}: expected UID:GID, e.g. 1000:1000"));
    let (u, g) = s.split_once(':').ok_or_else(bad)?;
    Ok((u.parse().map_err(|_| bad())?, g.parse().map_err(|_| bad())?))
}

/// Collects `Write`s into chunks and hands them to the sending side.
struct ChunkWriter {
    buf: Vec<u8>,
    tx: tokio::sync::mpsc::Sender<io::Result<Bytes>>,
    sent: u64,
    /// Cancelled when the sync is interrupted: the writer stops, and the
    /// body ends in an error, which aborts the request.
    stop: CancellationToken,
}

impl ChunkWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.stop.is_cancelled() {
            // Not ErrorKind::Interrupted: writers retry that one forever.
            return Err(io::Error::other("the sync was interrupted"));
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.sent += chunk.len() as u64;
        self.tx
            .blocking_send(Ok(Bytes::from(chunk)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped"))
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CHUNK - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// Reads exactly `len` bytes of a file, or fails: a file that changes size
/// while it is sent would otherwise corrupt the archive.
struct Exact<R> {
    inner: R,
    left: u64,
    path: PathBuf,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let max = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = self.inner.read(&mut buf[..max])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} shrank while it was sent", self.path.display()),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// What the tar writer needs to know.
#[derive(Debug, Clone)]
pub struct TarPlan {
    pub root: PathBuf,
    pub excludes: Excludes,
    pub owner: Option<(u64, u64)>,
}

/// Writes the tar of `plan.root`'s content (not the root itself) to `out`.
pub fn write_tar<W: Write>(plan: &TarPlan, out: W) -> Result<(Stats, W), SyncError> {
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    let mut stats = Stats::default();
    visit(plan, &mut builder, &plan.root, Path::new(""), &mut stats)?;
    let out = builder
        .into_inner()
        .map_err(|e| SyncError::local("finishing the archive", e))?;
    Ok((stats, out))
}

fn visit<W: Write>(
    plan: &TarPlan,
    builder: &mut tar::Builder<W>,
    dir: &Path,
    rel_dir: &Path,
    stats: &mut Stats,
) -> Result<(), SyncError> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| SyncError::local(format!("reading {}", dir.display()), e))?
        .collect::<Result<_, _>>()
        .map_err(|e| SyncError::local(format!("reading {}", dir.display()), e))?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for entry in entries {
        let abs = entry.path();
        let rel = rel_dir.join(entry.file_name());
        let meta = std::fs::symlink_metadata(&abs)
            .map_err(|e| SyncError::local(format!("reading {}", abs.display()), e))?;
        let ft = meta.file_type();
        let rel_str = rel.to_string_lossy();
        if plan.excludes.excludes(&rel_str) {
            if ft.is_dir() && !plan.excludes.can_skip_dir(&rel_str) {
                visit(plan, builder, &abs, &rel, stats)?;
            }
            continue;
        }
        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
        if let Some((uid, gid)) = plan.owner {
            header.set_uid(uid);
            header.set_gid(gid);
        }
        let failed = |e: io::Error| SyncError::local(format!("adding {}", abs.display()), e);
        if ft.is_dir() {
            header.set_size(0);
            builder
                .append_data(&mut header, &rel, io::empty())
                .map_err(failed)?;
            stats.dirs += 1;
            visit(plan, builder, &abs, &rel, stats)?;
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&abs).map_err(failed)?;
            header.set_size(0);
            builder
                .append_link(&mut header, &rel, &target)
                .map_err(failed)?;
            stats.symlinks += 1;
        } else if ft.is_file() {
            let file = std::fs::File::open(&abs).map_err(failed)?;
            let len = meta.len();
            let reader = Exact {
                inner: file,
                left: len,
                path: abs.clone(),
            };
            builder
                .append_data(&mut header, &rel, reader)
                .map_err(failed)?;
            stats.files += 1;
            stats.content_bytes += len;
        } else {
            eprintln!(
                "berth: skipping {} (not a file, directory or symlink)",
                abs.display()
            );
            stats.skipped += 1;
        }
    }
    Ok(())
}

/// Copies `args.path` into the volume `args.volume`.
pub async fn sync_to<V: VolumeArchive>(
    volumes: &V,
    volume: &str,
    plan: TarPlan,
    shutdown: &CancellationToken,
) -> Result<Stats, SyncError> {
    check_volume_name(volume)?;
    volumes.ensure_helper_image().await?;
    let id = volumes.create_helper(volume).await?;
    let stop = shutdown.child_token();
    let result = tokio::select! {
        r = upload(volumes, &id, plan, stop.clone()) => r,
        () = shutdown.cancelled() => Err(SyncError::Interrupted),
    };
    // The transfer may notice the interruption first and fail with it.
    let result = match result {
        Err(_) if shutdown.is_cancelled() => Err(SyncError::Interrupted),
        r => r,
    };
    stop.cancel();
    let removed = volumes.remove_helper(&id).await;
    let stats = result?;
    removed?;
    Ok(stats)
}

async fn upload<V: VolumeArchive>(
    volumes: &V,
    id: &str,
    plan: TarPlan,
    stop: CancellationToken,
) -> Result<Stats, SyncError> {
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(CHUNKS_IN_FLIGHT);
    let writer = tokio::task::spawn_blocking(move || {
        let out = ChunkWriter {
            buf: Vec::with_capacity(CHUNK),
            tx: tx.clone(),
            sent: 0,
            stop,
        };
        match write_tar(&plan, out) {
            Ok((mut stats, mut out)) => {
                out.flush()
                    .map_err(|e| SyncError::local("sending the archive", e))?;
                stats.wire_bytes = out.sent;
                Ok(stats)
            }
            Err(e) => {
                // Abort the upload: dockerd must not see a valid end of
                // archive after a partial tree.
                let _ = tx.blocking_send(Err(io::Error::other(e.to_string())));
                Err(e)
            }
        }
    });
    let body: TarStream = Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx));
    let sent = volumes.put_archive(id, MOUNT_POINT, body).await;
    let written = writer
        .await
        .map_err(|e| SyncError::local("the archive writer", io::Error::other(e.to_string())))?;
    // A local failure explains a failed upload better than the upload does.
    let stats = written?;
    sent?;
    Ok(stats)
}

/// Copies `container_path` (under [`MOUNT_POINT`]) of `volume` into `dest`.
pub async fn sync_from<V: VolumeArchive>(
    volumes: &V,
    volume: &str,
    container_path: &str,
    dest: &Path,
    shutdown: &CancellationToken,
) -> Result<Stats, SyncError> {
    check_volume_name(volume)?;
    if !volumes.volume_exists(volume).await? {
        return Err(SyncError::NoVolume(volume.to_owned()));
    }
    std::fs::create_dir_all(dest)
        .map_err(|e| SyncError::local(format!("creating {}", dest.display()), e))?;
    volumes.ensure_helper_image().await?;
    let id = volumes.create_helper(volume).await?;
    let result = tokio::select! {
        r = download(volumes, &id, container_path, dest) => r,
        () = shutdown.cancelled() => Err(SyncError::Interrupted),
    };
    // The transfer may notice the interruption first and fail with it.
    let result = match result {
        Err(_) if shutdown.is_cancelled() => Err(SyncError::Interrupted),
        r => r,
    };
    let removed = volumes.remove_helper(&id).await;
    let stats = result?;
    removed?;
    Ok(stats)
}

async fn download<V: VolumeArchive>(
    volumes: &V,
    id: &str,
    container_path: &str,
    dest: &Path,
) -> Result<Stats, SyncError> {
    let stream = volumes.get_archive(id, container_path);
    let counted = CountingStream::new(stream);
    let wire = counted.counter();
    let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(counted));
    let dest = dest.to_owned();
    let mut stats = tokio::task::spawn_blocking(move || unpack(reader, &dest))
        .await
        .map_err(|e| SyncError::local("the archive reader", io::Error::other(e.to_string())))??;
    stats.wire_bytes = wire.load(std::sync::atomic::Ordering::Relaxed);
    Ok(stats)
}

/// Counts the bytes a stream yields.
struct CountingStream {
    inner: TarStream,
    count: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl CountingStream {
    fn new(inner: TarStream) -> Self {
        Self {
            inner,
            count: Default::default(),
        }
    }

    fn counter(&self) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
        self.count.clone()
    }
}

impl Stream for CountingStream {
    type Item = io::Result<Bytes>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let polled = self.inner.as_mut().poll_next(cx);
        if let std::task::Poll::Ready(Some(Ok(b))) = &polled {
            self.count
                .fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        polled
    }
}

/// Only plain relative components; `None` for anything that could leave
/// the destination (`..`, absolute paths).
fn safe_relative(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Extracts a tar from a container's archive endpoint into `dest`: the top
/// directory entry is dropped (its content lands in `dest`), a top file
/// lands as `dest/NAME`. The archive is hostile input (the leased host's
/// root made it): every write goes through [`beneath::Beneath`], so nothing
/// is created, written or linked outside `dest`, also not through a symlink
/// the archive sent earlier, and setuid/setgid bits are dropped. Directory
/// modes and mtimes are set last, so extracting into them does not change
/// them again.
pub fn unpack<R: Read>(reader: R, dest: &Path) -> Result<Stats, SyncError> {
    let bad = |what: String| SyncError::local(what, io::Error::from(io::ErrorKind::InvalidData));
    let root = beneath::Beneath::open(dest)
        .map_err(|e| SyncError::local(format!("opening {}", dest.display()), e))?;
    let mut archive = tar::Archive::new(reader);
    let mut stats = Stats::default();
    let mut top: Option<PathBuf> = None;
    let mut first = true;
    let mut dirs: Vec<(PathBuf, u32, u64)> = Vec::new();
    let read_err = |e: io::Error| SyncError::local("reading the archive from the host", e);
    let in_top = |path: &Path, top: &Option<PathBuf>| -> Option<PathBuf> {
        let rel = match top {
            Some(t) => path.strip_prefix(t).ok()?.to_owned(),
            None => path.to_owned(),
        };
        safe_relative(&rel)
    };
    for entry in archive.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        let path = entry.path().map_err(read_err)?.into_owned();
        let kind = entry.header().entry_type();
        if std::mem::take(&mut first) && kind.is_dir() {
            top = Some(path);
            continue;
        }
        let rel = in_top(&path, &top)
            .ok_or_else(|| bad(format!("refusing archive entry {}", path.display())))?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let outside = |e: io::Error| {
            let why = if e.kind() == io::ErrorKind::InvalidData
                || e.raw_os_error() == Some(nix::errno::Errno::EXDEV as i32)
                || e.raw_os_error() == Some(nix::errno::Errno::ELOOP as i32)
            {
                format!(
                    "refusing archive entry {}: it would be written outside {} or through a link",
                    path.display(),
                    dest.display()
                )
            } else {
                format!("writing {}", dest.join(&rel).display())
            };
            SyncError::local(why, e)
        };
        // Read only where used: links carry no meaningful mode.
        let mode_and_mtime = |h: &tar::Header| {
            Ok::<_, SyncError>((h.mode().map_err(read_err)?, h.mtime().map_err(read_err)?))
        };
        if kind.is_dir() {
            let (mode, mtime) = mode_and_mtime(entry.header())?;
            root.ensure_dir(&rel).map_err(outside)?;
            dirs.push((rel, mode, mtime));
            stats.dirs += 1;
        } else if kind.is_hard_link() {
            // The link names another entry of the archive: it must resolve
            // inside the destination too.
            let link = entry
                .link_name()
                .map_err(read_err)?
                .ok_or_else(|| bad(format!("hard link {} without a target", path.display())))?
                .into_owned();
            let source = in_top(&link, &top).ok_or_else(|| {
                bad(format!(
                    "refusing hard link {} -> {}",
                    path.display(),
                    link.display()
                ))
            })?;
            root.hard_link(&rel, &source).map_err(outside)?;
            stats.files += 1;
        } else if kind.is_symlink() {
            let target = entry
                .link_name()
                .map_err(read_err)?
                .ok_or_else(|| bad(format!("symlink {} without a target", path.display())))?
                .into_owned();
            root.symlink(&rel, &target).map_err(outside)?;
            stats.symlinks += 1;
        } else if kind.is_file() {
            let (mode, mtime) = mode_and_mtime(entry.header())?;
            stats.files += 1;
            stats.content_bytes += entry.header().size().map_err(read_err)?;
            let mut file = root.create_file(&rel).map_err(outside)?;
            io::copy(&mut entry, &mut file).map_err(outside)?;
            let when = SystemTime::UNIX_EPOCH + Duration::from_secs(mtime);
            beneath::finish(&file, mode, when).map_err(outside)?;
        } else {
            stats.skipped += 1;
        }
    }
    for (dir, mode, mtime) in dirs.into_iter().rev() {
        let when = SystemTime::UNIX_EPOCH + Duration::from_secs(mtime);
        root.finish_dir(&dir, mode, when)
            .map_err(|e| SyncError::local(format!("setting {}", dest.join(&dir).display()), e))?;
    }
    Ok(stats)
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// The line printed on stderr after a sync.
pub fn summary(direction: &str, stats: &Stats, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-6);
    format!(
        "berth: synced {direction}: {} files, {} dirs, {} symlinks{}; {} of content, {} ({} bytes) on the wire in {:.2} s ({}/s)",
        stats.files,
        stats.dirs,
        stats.symlinks,
        if stats.skipped > 0 {
            format!(", {} skipped", stats.skipped)
        } else {
            String::new()
        },
        human_bytes(stats.content_bytes),
        human_bytes(stats.wire_bytes),
        stats.wire_bytes,
        secs,
        human_bytes((stats.wire_bytes as f64 / secs) as u64),
    )
}

/// `berth sync`: checks the arguments, runs the copy, prints the summary.
pub async fn run(args: &SyncArgs, shutdown: &CancellationToken) -> Result<Stats, SyncError> {
    let endpoint = LeaseEndpoint::new(&args.docker_host, &args.cert_dir)?;
    let started = Instant::now();
    let (stats, direction) = if let Some(spec) = &args.from {
        let (volume, inside) = parse_from(spec)?;
        let volumes = LeaseVolumes::new(&endpoint, args.timeout)?;
        let stats = sync_from(&volumes, &volume, &inside, &args.path, shutdown).await?;
        (stats, format!("volume {spec} -> {}", args.path.display()))
    } else {
        let volume = args
            .volume
            .as_deref()
            .ok_or_else(|| SyncError::Usage("--volume NAME or --from NAME is needed".into()))?;
        check_volume_name(volume)?;
        let meta = std::fs::metadata(&args.path)
            .map_err(|e| SyncError::Usage(format!("{}: {e}", args.path.display())))?;
        if !meta.is_dir() {
            return Err(SyncError::Usage(format!(
                "{} is not a directory",
                args.path.display()
            )));
        }
        let excludes = ignore::load(&args.path, args.exclude_from.as_deref(), &args.excludes)
            .map_err(SyncError::Usage)?;
        let owner = args.chown.as_deref().map(parse_chown).transpose()?;
        let plan = TarPlan {
            root: args.path.clone(),
            excludes,
            owner,
        };
        let volumes = LeaseVolumes::new(&endpoint, args.timeout)?;
        let stats = sync_to(&volumes, volume, plan, shutdown).await?;
        (stats, format!("{} -> volume {volume}", args.path.display()))
    };
    eprintln!("{}", summary(&direction, &stats, started.elapsed()));
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
    use std::sync::Mutex;

    use super::*;

    /// Volumes as local directories; archives packed and unpacked with the
    /// tar crate the way dockerd would.
    struct DirVolumes {
        root: PathBuf,
        /// container id -> volume
        helpers: Mutex<HashMap<String, String>>,
        removed: Mutex<Vec<String>>,
        fail_put: bool,
    }

    impl DirVolumes {
        fn new(root: &Path) -> Self {
            Self {
                root: root.to_owned(),
                helpers: Mutex::default(),
                removed: Mutex::default(),
                fail_put: false,
            }
        }

        fn volume_dir(&self, id: &str, path: &str) -> PathBuf {
            let vol = self.helpers.lock().unwrap()[id].clone();
            let inside = path
                .strip_prefix(MOUNT_POINT)
                .unwrap()
                .trim_start_matches('/');
            self.root.join(vol).join(inside)
        }
    }

    impl VolumeArchive for DirVolumes {
        async fn volume_exists(&self, volume: &str) -> Result<bool, SyncError> {
            Ok(self.root.join(volume).is_dir())
        }

        async fn ensure_helper_image(&self) -> Result<(), SyncError> {
            Ok(())
        }

        async fn create_helper(&self, volume: &str) -> Result<String, SyncError> {
            let id = uuid::Uuid::new_v4().to_string();
            std::fs::create_dir_all(self.root.join(volume)).unwrap();
            self.helpers
                .lock()
                .unwrap()
                .insert(id.clone(), volume.to_owned());
            Ok(id)
        }

        async fn put_archive(
            &self,
            id: &str,
            path: &str,
            body: TarStream,
        ) -> Result<(), SyncError> {
            let bytes: Vec<Bytes> = body
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<io::Result<_>>()
                .map_err(|e| SyncError::Docker {
                    op: "upload",
                    status: None,
                    reason: e.to_string(),
                })?;
            if self.fail_put {
                return Err(SyncError::Docker {
                    op: "upload",
                    status: Some(500),
                    reason: "no space left on device".into(),
                });
            }
            let all: Vec<u8> = bytes.concat();
            let mut ar = tar::Archive::new(all.as_slice());
            ar.set_preserve_permissions(true);
            ar.set_preserve_mtime(true);
            ar.unpack(self.volume_dir(id, path)).unwrap();
            Ok(())
        }

        fn get_archive(&self, id: &str, path: &str) -> TarStream {
            let dir = self.volume_dir(id, path);
            let name = Path::new(path).file_name().unwrap().to_owned();
            let mut b = tar::Builder::new(Vec::new());
            b.follow_symlinks(false);
            if dir.is_dir() {
                b.append_dir_all(&name, &dir).unwrap();
            } else {
                b.append_path_with_name(&dir, &name).unwrap();
            }
            let data = b.into_inner().unwrap();
            let chunks: Vec<io::Result<Bytes>> = data
                .chunks(1000)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            Box::pin(futures::stream::iter(chunks))
        }

        async fn remove_helper(&self, id: &str) -> Result<(), SyncError> {
            self.removed.lock().unwrap().push(id.to_owned());
            Ok(())
        }
    }

    fn tree(root: &Path) {
        std::fs::create_dir_all(root.join("src/nested/deep")).unwrap();
        std::fs::create_dir_all(root.join("target/debug")).unwrap();
        std::fs::write(root.join("src/main.rs"), "fn main() {}\n").unwrap();
        std::fs::write(root.join("src/nested/deep/data.bin"), vec![7u8; 300_000]).unwrap();
        std::fs::write(root.join("target/debug/big"), vec![1u8; 1000]).unwrap();
        std::fs::write(root.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
        std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o751))
            .unwrap();
        symlink("src/main.rs", root.join("main-link")).unwrap();
        std::fs::write(root.join(".berthignore"), "target\n*.log\n").unwrap();
        std::fs::write(root.join("x.log"), "noise").unwrap();
        let long = "d".repeat(120);
        std::fs::create_dir_all(root.join(&long)).unwrap();
        std::fs::write(root.join(&long).join("f".repeat(120)), "long").unwrap();
    }

    fn plan(root: &Path) -> TarPlan {
        TarPlan {
            root: root.to_owned(),
            excludes: ignore::load(root, None, &[]).unwrap(),
            owner: None,
        }
    }

    #[tokio::test]
    async fn a_tree_round_trips_with_modes_links_and_mtimes() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        tree(&src);
        let vols = DirVolumes::new(&tmp.path().join("volumes"));
        let token = CancellationToken::new();
        let stats = sync_to(&vols, "work", plan(&src), &token).await.unwrap();
        assert_eq!(stats.symlinks, 1);
        assert_eq!(stats.files, 5, "{stats:?}");
        assert_eq!(stats.content_bytes, 13 + 300_000 + 18 + 13 + 4, "{stats:?}");
        assert!(stats.wire_bytes > stats.content_bytes);
        assert_eq!(vols.removed.lock().unwrap().len(), 1, "helper removed");

        let vol = tmp.path().join("volumes/work");
        assert!(!vol.join("target").exists(), "excluded dir synced");
        assert!(!vol.join("x.log").exists(), "excluded file synced");
        assert_eq!(
            std::fs::read_link(vol.join("main-link")).unwrap(),
            Path::new("src/main.rs")
        );
        let m = std::fs::metadata(vol.join("run.sh")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o751);
        let src_mtime = std::fs::metadata(src.join("src/main.rs")).unwrap().mtime();
        assert_eq!(
            std::fs::metadata(vol.join("src/main.rs")).unwrap().mtime(),
            src_mtime
        );

        // Back again, into a fresh directory.
        let back = tmp.path().join("back");
        let stats = sync_from(&vols, "work", MOUNT_POINT, &back, &token)
            .await
            .unwrap();
        assert_eq!(stats.files, 5, "{stats:?}");
        assert_eq!(vols.removed.lock().unwrap().len(), 2);
        assert_eq!(
            std::fs::read(back.join("src/nested/deep/data.bin")).unwrap(),
            vec![7u8; 300_000]
        );
        assert_eq!(
            std::fs::metadata(back.join("run.sh")).unwrap().mode() & 0o7777,
            0o751
        );
        assert!(
            std::fs::symlink_metadata(back.join("main-link"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        // Directory mtimes survive the files extracted into them.
        assert_eq!(
            std::fs::metadata(back.join("src")).unwrap().mtime(),
            std::fs::metadata(vol.join("src")).unwrap().mtime()
        );

        // One file of the volume, into a directory.
        let one = tmp.path().join("one");
        let (name, inside) = parse_from("work:src/main.rs").unwrap();
        sync_from(&vols, &name, &inside, &one, &token)
            .await
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(one.join("main.rs")).unwrap(),
            "fn main() {}\n"
        );
    }

    #[tokio::test]
    async fn the_helper_goes_also_when_the_upload_fails() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        tree(&src);
        let mut vols = DirVolumes::new(&tmp.path().join("volumes"));
        vols.fail_put = true;
        let err = sync_to(&vols, "work", plan(&src), &CancellationToken::new())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("no space left"), "{err}");
        assert_eq!(vols.removed.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn copying_back_a_missing_volume_creates_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let vols = DirVolumes::new(&tmp.path().join("volumes"));
        let dest = tmp.path().join("dest");
        let err = sync_from(&vols, "nope", MOUNT_POINT, &dest, &CancellationToken::new())
            .await
            .unwrap_err();
        assert_eq!(err.exit_code(), Exit::NotFound, "{err}");
        assert!(
            vols.helpers.lock().unwrap().is_empty(),
            "a helper was created"
        );
        assert!(!dest.exists(), "the destination was created");
    }

    #[tokio::test]
    async fn an_interrupted_sync_removes_its_helper() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        tree(&src);
        let vols = DirVolumes::new(&tmp.path().join("volumes"));
        let token = CancellationToken::new();
        token.cancel();
        let err = sync_to(&vols, "work", plan(&src), &token)
            .await
            .unwrap_err();
        assert!(matches!(err, SyncError::Interrupted), "{err}");
        assert_eq!(vols.removed.lock().unwrap().len(), 1);
    }

    #[test]
    fn owners_can_be_overridden() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("f"), "x").unwrap();
        let mut p = plan(tmp.path());
        p.owner = Some(parse_chown("1234:5678").unwrap());
        let (_, data) = write_tar(&p, Vec::new()).unwrap();
        let mut ar = tar::Archive::new(data.as_slice());
        let e = ar.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(
            (e.header().uid().unwrap(), e.header().gid().unwrap()),
            (1234, 5678)
        );
        assert!(parse_chown("1000").is_err());
        assert!(parse_chown("a:b").is_err());
    }

    #[test]
    fn archives_cannot_escape_the_destination() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        let dest = tmp.path().join("dest");
        std::fs::create_dir_all(&dest).unwrap();

        // A symlink to outside, then a file through it.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, "v", io::empty()).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "v/evil", &outside).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(3);
        b.append_data(&mut h, "v/evil/pwned", &b"bad"[..]).unwrap();
        let data = b.into_inner().unwrap();
        let err = unpack(data.as_slice(), &dest).unwrap_err();
        assert!(err.to_string().contains("outside"), "{err}");
        assert!(!outside.join("pwned").exists());

        // A file deeper under the link: no directory is made outside first.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "evil2", &outside).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(3);
        b.append_data(&mut h, "evil2/sub/dir/pwned", &b"bad"[..])
            .unwrap();
        let data = b.into_inner().unwrap();
        let err = unpack(data.as_slice(), &dest).unwrap_err();
        assert!(err.to_string().contains("outside"), "{err}");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    }

    #[test]
    fn setuid_and_setgid_bits_are_dropped_on_the_way_back() {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        for (path, mode) in [("top", 0o755), ("top/sgid-dir", 0o2775)] {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(mode);
            h.set_size(0);
            b.append_data(&mut h, path, io::empty()).unwrap();
        }
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o4755);
        h.set_size(2);
        b.append_data(&mut h, "top/sgid-dir/suid", &b"#!"[..])
            .unwrap();
        let data = b.into_inner().unwrap();
        let dest = tmp.path().join("dest");
        std::fs::create_dir_all(&dest).unwrap();
        let stats = unpack(data.as_slice(), &dest).unwrap();
        assert_eq!((stats.files, stats.dirs), (1, 1));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&dest.join("sgid-dir/suid")), 0o755);
        assert_eq!(mode(&dest.join("sgid-dir")), 0o775);
    }

    #[test]
    fn from_specs_stay_inside_the_volume() {
        assert_eq!(
            parse_from("work").unwrap(),
            ("work".into(), MOUNT_POINT.to_owned())
        );
        assert_eq!(
            parse_from("work:/out/./reports/").unwrap(),
            ("work".into(), format!("{MOUNT_POINT}/out/reports"))
        );
        assert!(parse_from("work:../etc").is_err());
        assert!(parse_from("work:a/../../etc").is_err());
        assert!(parse_from("-bad").is_err());
        assert!(check_volume_name("a").is_err());
        assert!(check_volume_name("ok_vol.1-x").is_ok());
        assert!(check_volume_name("no/slash").is_err());
    }

    #[test]
    fn summaries_name_bytes_and_time() {
        let s = summary(
            "a -> volume b",
            &Stats {
                files: 3,
                content_bytes: 3 * 1024 * 1024,
                wire_bytes: 3 * 1024 * 1024 + 4096,
                ..Default::default()
            },
            Duration::from_secs(2),
        );
        assert!(s.contains("3 files"), "{s}");
        assert!(s.contains("3.0 MiB of content"), "{s}");
        assert!(s.contains("3149824 bytes"), "{s}");
        assert!(s.contains("2.00 s"), "{s}");
    }
}
