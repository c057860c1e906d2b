//! The agent's mutual-TLS Docker front against the two alternatives, on the
//! same data in one run:
//!
//! - **unix socket**: dockerd's own socket on the host, no TLS, no proxy;
//!   the floor.
//! - **berth TLS front**: a real `berth up` host with a real lease; the
//!   client presents the certificate `berth acquire` wrote.
//! - **dockerd --tlsverify**: a separate dockerd started here just for the
//!   comparison, in its own network namespace, listening with its own TLS
//!   (Go's crypto/tls) on TCP; torn down afterwards.
//! - **plain TCP proxy**: the front's copy without TLS: a forwarder the
//!   benchmark runs on threads of its own, listening in the host's network
//!   namespace on the front's address and copying each connection to the
//!   same dockerd's socket as the front does (tokio's bidirectional copy,
//!   64 KiB each way). Against it the front's figure is what TLS costs;
//!   against the unix socket it is what the network path and one proxy hop
//!   cost without TLS.
//!
//! Figures: bulk transfer both ways with an image made of random (so
//! incompressible) layers — upload with `POST /images/load` (what `docker
//! load` does), download with `GET /images/NAME/get` (`docker save`) — and
//! sequential small requests (`GET /_ping`) on one keep-alive connection,
//! plus a few on a fresh connection each (what every `docker` invocation
//! pays). The client is the same Rust HTTP/1.1 client with rustls for every
//! path, so the differences are the servers'.

use std::fmt;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::net::{TcpStream, UnixStream};

use super::http::{Conn, Stream};
use super::{BenchError, Figure, Summary, ms};
use berth_agent::docker::front::COPY_BUFFER;
use berth_testkit::{LeaseEnv, Pool, test_prefix};

/// Tag of the image the benchmark loads and saves.
const IMAGE: &str = "berth-bench:latest";
/// Bound on starting the comparison dockerd.
const DOCKERD_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Unmeasured requests before the latency series.
const WARMUP: usize = 20;

/// What to measure.
#[derive(Debug, Clone)]
pub struct Options {
    /// Size of the image's random data, MiB (split over `layers`).
    pub bulk_mib: u64,
    pub layers: u32,
    /// Bulk rounds per path (load + save each), interleaved across paths.
    pub rounds: usize,
    /// Sequential `/_ping` requests per path on one connection.
    pub requests: usize,
    /// `/_ping` requests per path on a new connection each.
    pub connects: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            bulk_mib: 512,
            layers: 4,
            rounds: 3,
            requests: 1000,
            connects: 100,
        }
    }
}

impl Options {
    /// Tiny sizes for CI's smoke run.
    pub fn smoke() -> Self {
        Self {
            bulk_mib: 4,
            layers: 2,
            rounds: 1,
            requests: 50,
            connects: 5,
        }
    }
}

/// The figures of one path.
#[derive(Debug, Clone)]
pub struct PathFigures {
    pub name: &'static str,
    /// MiB/s per round.
    pub load: Summary,
    pub save: Summary,
    /// Milliseconds per request.
    pub ping: Summary,
    pub connect_ping: Summary,
    /// The samples behind the summaries, for [`figures`].
    pub samples: PathSamples,
}

/// Every sample of one path, in the units of [`PathFigures`].
#[derive(Debug, Clone, Default)]
pub struct PathSamples {
    pub load: Vec<f64>,
    pub save: Vec<f64>,
    pub ping: Vec<f64>,
    pub connect_ping: Vec<f64>,
}

/// What [`run`] measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub machine: String,
    pub docker_version: String,
    pub image_bytes: u64,
    pub options: Options,
    pub paths: Vec<PathFigures>,
}

impl Report {
    pub fn path(&self, name: &str) -> Option<&PathFigures> {
        self.paths.iter().find(|p| p.name == name)
    }
}

pub const UNIX: &str = "unix socket";
pub const FRONT: &str = "berth TLS front";
pub const DOCKERD_TLS: &str = "dockerd --tlsverify";
pub const PLAIN: &str = "plain TCP proxy";

pub(super) enum Target {
    Unix(PathBuf),
    Tcp(SocketAddr),
    Tls {
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
    },
}

impl Target {
    pub(super) async fn connect(&self) -> std::io::Result<Conn<Box<dyn Stream>>> {
        let stream: Box<dyn Stream> = match self {
            Target::Unix(p) => Box::new(UnixStream::connect(p).await?),
            Target::Tcp(addr) => {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                Box::new(tcp)
            }
            Target::Tls { addr, config } => {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await?;
                Box::new(tls)
            }
        };
        Ok(Conn::new(stream))
    }
}

fn io_err(what: String) -> std::io::Error {
    std::io::Error::other(what)
}

/// Runs the benchmark: starts a one-host pool and the comparison dockerd,
/// measures, and tears both down (also on failure).
pub fn run(opts: &Options) -> std::io::Result<Report> {
    let pool = Pool::start("bmk-", 1, &[]);
    let lease = pool.acquire("bench", "2h", "1m");
    let scratch = pool.state_dir.join("bench");
    std::fs::create_dir_all(&scratch)?;
    let tar = scratch.join("image.tar");
    let image_bytes = write_image_tar(&tar, opts.bulk_mib * 1024 * 1024, opts.layers)?;

    let front = front_target(&lease)?;
    let host_id = lease.get("BERTH_HOST_ID");
    let socket = pool.docker_socket(host_id);
    let unix = Target::Unix(socket.clone());
    let cmp = ComparisonDockerd::start(&test_prefix("bmd-"))?;
    let netns = berth_agent::provider::netns::netns_path(host_id);
    let plain = PlainProxy::start(&netns, lease.front_addr().ip(), &socket)?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let targets = [
        (UNIX, unix),
        (FRONT, front),
        (DOCKERD_TLS, cmp.target()?),
        (PLAIN, Target::Tcp(plain.addr)),
    ];
    let measured = rt.block_on(measure(&targets, &tar, image_bytes, opts));
    drop(rt);
    drop(plain);
    drop(cmp);
    let (paths, docker_version) = measured?;
    let _ = std::fs::remove_file(&tar);
    ok_release(&pool, &lease);
    Ok(Report {
        machine: super::machine(),
        docker_version,
        image_bytes,
        options: opts.clone(),
        paths,
    })
}

/// [`run`] on a thread of its own (it starts a `berth up` pool and runtimes
/// of its own), for the async suite.
pub async fn run_in_thread(opts: Options) -> Result<Report, BenchError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("berth-bench-tls-front".into())
        .spawn(move || {
            let _ = tx.send(run(&opts));
        })
        .map_err(BenchError::io("starting the TLS front benchmark's thread"))?;
    match rx.await {
        Ok(r) => r.map_err(BenchError::io("the TLS front benchmark")),
        Err(_) => Err(BenchError::step(
            "the TLS front benchmark",
            "it panicked (see the message above)",
        )),
    }
}

/// Bulk goals of the TLS issue: at least this share of the unix socket's
/// throughput, and of dockerd's own TLS listener's.
const BULK_VS_UNIX: f64 = 0.9;
const BULK_VS_DOCKERD_TLS: f64 = 1.0;
/// Goal for the p50 latency the front adds per small request.
const ADDED_PING_MS: f64 = 0.3;

/// The report as suite figures: the front against each baseline.
pub fn figures(report: &Report) -> Vec<Figure> {
    let (Some(u), Some(fr), Some(d), Some(p)) = (
        report.path(UNIX),
        report.path(FRONT),
        report.path(DOCKERD_TLS),
        report.path(PLAIN),
    ) else {
        return vec![];
    };
    let note = format!(
        "image {:.0} MiB in {} random layers, {} rounds; {} sequential /_ping, {} new connections per path; dockerd {}",
        report.image_bytes as f64 / 1048576.0,
        report.options.layers,
        report.options.rounds,
        report.options.requests,
        report.options.connects,
        report.docker_version
    );
    let bulk = |key: &str, what: &str, pick: fn(&PathSamples) -> &Vec<f64>| {
        let vs_unix = Figure::new(format!("{key} vs unix"), what.to_owned(), "MiB/s")
            .samples(pick(&fr.samples).clone())
            .baseline(UNIX, pick(&u.samples).clone());
        let r = vs_unix.ratio();
        let vs_unix = vs_unix.check(
            format!(">= {BULK_VS_UNIX}x the unix socket"),
            r.is_some_and(|r| r >= BULK_VS_UNIX),
        );
        let vs_tls = Figure::new(format!("{key} vs dockerd TLS"), what.to_owned(), "MiB/s")
            .samples(pick(&fr.samples).clone())
            .baseline(DOCKERD_TLS, pick(&d.samples).clone());
        let r = vs_tls.ratio();
        let vs_tls = vs_tls.check(
            format!(">= {BULK_VS_DOCKERD_TLS}x dockerd's TLS"),
            r.is_some_and(|r| r >= BULK_VS_DOCKERD_TLS),
        );
        // What TLS and the lease check cost over the same copy without them.
        let vs_plain = Figure::new(format!("{key} vs plain TCP"), what.to_owned(), "MiB/s")
            .samples(pick(&fr.samples).clone())
            .baseline(PLAIN, pick(&p.samples).clone());
        [vs_unix, vs_tls, vs_plain]
    };
    let mut out = vec![];
    out.extend(bulk(
        "TLS front load",
        "bulk upload through the front, POST /images/load (docker load)",
        |s| &s.load,
    ));
    out.extend(bulk(
        "TLS front save",
        "bulk download through the front, GET /images/NAME/get (docker save)",
        |s| &s.save,
    ));
    let added = fr.ping.median - u.ping.median;
    out.push(
        Figure::new(
            "TLS front /_ping",
            "sequential GET /_ping through the front on one keep-alive connection",
            "ms",
        )
        .samples(fr.samples.ping.clone())
        .baseline(UNIX, u.samples.ping.clone())
        .check(
            format!("p50 added <= {ADDED_PING_MS} ms"),
            added <= ADDED_PING_MS,
        )
        .note(format!("added p50: {added:+.3} ms"))
        .note(note),
    );
    out.push(
        Figure::new(
            "TLS front connect+/_ping",
            "new connection (TCP + mutual TLS handshake) + GET /_ping through the front",
            "ms",
        )
        .samples(fr.samples.connect_ping.clone())
        .baseline(DOCKERD_TLS, d.samples.connect_ping.clone()),
    );
    out
}

fn ok_release(pool: &Pool, lease: &LeaseEnv) {
    let _ = pool.berth(&["release", "--lease", lease.lease_id()]);
}

fn front_target(lease: &LeaseEnv) -> std::io::Result<Target> {
    let d = lease.cert_dir();
    let read = |f: &str| std::fs::read_to_string(d.join(f));
    let config =
        berth_tls::lease_client_config(&read("ca.pem")?, &read("cert.pem")?, &read("key.pem")?)
            .map_err(|e| io_err(e.to_string()))?;
    Ok(Target::Tls {
        addr: lease.front_addr(),
        config,
    })
}

async fn measure(
    targets: &[(&'static str, Target)],
    tar: &Path,
    image_bytes: u64,
    opts: &Options,
) -> std::io::Result<(Vec<PathFigures>, String)> {
    let mib = image_bytes as f64 / (1024.0 * 1024.0);
    let mut load = vec![Vec::new(); targets.len()];
    let mut save = vec![Vec::new(); targets.len()];
    let mut version = String::new();
    for (name, t) in targets {
        let mut c = t.connect().await?;
        let v = c.get("GET", "/version").await?;
        if v.status != 200 {
            return Err(io_err(format!("{name}: /version answered {}", v.status)));
        }
        let text = String::from_utf8_lossy(&v.head);
        if let Some(rest) = text.split("\"Version\":\"").nth(1) {
            version = rest.split('"').next().unwrap_or("").to_owned();
        }
        // A leftover from an interrupted run would make the first load cheap.
        c.get("DELETE", &format!("/images/{IMAGE}?force=1")).await?;
    }
    for _round in 0..opts.rounds {
        for (i, (name, t)) in targets.iter().enumerate() {
            let mut c = t.connect().await?;
            let started = Instant::now();
            let r = c.post_file("/images/load?quiet=1", tar).await?;
            let took = started.elapsed();
            let body = String::from_utf8_lossy(&r.head);
            if r.status != 200 || body.contains("errorDetail") {
                return Err(io_err(format!(
                    "{name}: load failed ({}): {body}",
                    r.status
                )));
            }
            load[i].push(mib / took.as_secs_f64());

            let started = Instant::now();
            let r = c.get("GET", &format!("/images/{IMAGE}/get")).await?;
            let took = started.elapsed();
            if r.status != 200 || r.body_len < image_bytes / 2 {
                return Err(io_err(format!(
                    "{name}: save failed ({}, {} bytes)",
                    r.status, r.body_len
                )));
            }
            save[i].push(r.body_len as f64 / (1024.0 * 1024.0) / took.as_secs_f64());
            let r = c.get("DELETE", &format!("/images/{IMAGE}?force=1")).await?;
            if r.status != 200 {
                return Err(io_err(format!(
                    "{name}: image delete answered {}",
                    r.status
                )));
            }
        }
    }
    let mut out = Vec::new();
    for (i, (name, t)) in targets.iter().enumerate() {
        let mut c = t.connect().await?;
        let mut samples = Vec::with_capacity(opts.requests);
        for n in 0..WARMUP + opts.requests {
            let started = Instant::now();
            let r = c.get("GET", "/_ping").await?;
            let took = started.elapsed();
            if r.status != 200 || r.head != b"OK" {
                return Err(io_err(format!("{name}: /_ping answered {}", r.status)));
            }
            if n >= WARMUP {
                samples.push(ms(took));
            }
        }
        let mut fresh = Vec::with_capacity(opts.connects);
        for _ in 0..opts.connects {
            let started = Instant::now();
            let mut c = t.connect().await?;
            let r = c.get("GET", "/_ping").await?;
            fresh.push(ms(started.elapsed()));
            if r.status != 200 {
                return Err(io_err(format!("{name}: /_ping answered {}", r.status)));
            }
        }
        let none = || io_err(format!("{name}: no samples"));
        out.push(PathFigures {
            name,
            load: Summary::of(&load[i]).ok_or_else(none)?,
            save: Summary::of(&save[i]).ok_or_else(none)?,
            ping: Summary::of(&samples).ok_or_else(none)?,
            connect_ping: Summary::of(&fresh).ok_or_else(none)?,
            samples: PathSamples {
                load: load[i].clone(),
                save: save[i].clone(),
                ping: samples,
                connect_ping: fresh,
            },
        });
    }
    Ok((out, version))
}

// ---------------------------------------------------------------------------
// The image: random layers in the `docker save` format.

fn octal(field: &mut [u8], v: u64) {
    let s = format!("{v:0width$o}\0", width = field.len() - 1);
    field.copy_from_slice(s.as_bytes());
}

fn tar_header(name: &str, size: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    octal(&mut h[100..108], 0o644);
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], 1_700_000_000);
    h[148..156].fill(b' ');
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    h
}

fn pad(size: u64) -> usize {
    usize::try_from((512 - size % 512) % 512).unwrap_or(0)
}

/// Writes `w` into a tar entry named `name` of `size` bytes.
fn tar_file(
    out: &mut impl std::io::Write,
    name: &str,
    size: u64,
    body: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    out.write_all(&tar_header(name, size))?;
    body(out)?;
    out.write_all(&vec![0u8; pad(size)])
}

/// Writes an image tar of `layers` layers holding `bytes` random bytes in
/// all; returns the tar's size.
pub fn write_image_tar(path: &Path, bytes: u64, layers: u32) -> std::io::Result<u64> {
    let layers = layers.max(1);
    let per_layer = (bytes / u64::from(layers)).max(1);
    let dir = path.with_extension("layers");
    std::fs::create_dir_all(&dir)?;
    let mut rng = rand::rng();
    let mut diff_ids = Vec::new();
    let mut layer_files = Vec::new();
    for i in 0..layers {
        let file = dir.join(format!("layer{i}.tar"));
        let mut hasher = Sha256::new();
        {
            let f = std::fs::File::create(&file)?;
            let mut w = HashingWriter {
                inner: std::io::BufWriter::with_capacity(1 << 20, f),
                hasher: &mut hasher,
            };
            tar_file(&mut w, &format!("blob{i}"), per_layer, |w| {
                let mut buf = vec![0u8; 1 << 20];
                let mut left = per_layer;
                while left > 0 {
                    let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
                    rng.fill_bytes(&mut buf[..n]);
                    w.write_all(&buf[..n])?;
                    left -= n as u64;
                }
                Ok(())
            })?;
            w.write_all(&[0u8; 1024])?;
            w.inner.flush()?;
        }
        diff_ids.push(format!("sha256:{:x}", hasher.finalize()));
        layer_files.push(file);
    }
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":[{}]}}}}"#,
        diff_ids
            .iter()
            .map(|d| format!("\"{d}\""))
            .collect::<Vec<_>>()
            .join(",")
    );
    let manifest = format!(
        r#"[{{"Config":"config.json","RepoTags":["{IMAGE}"],"Layers":[{}]}}]"#,
        (0..layers)
            .map(|i| format!("\"layer{i}/layer.tar\""))
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    for (i, file) in layer_files.iter().enumerate() {
        let size = std::fs::metadata(file)?.len();
        tar_file(&mut out, &format!("layer{i}/layer.tar"), size, |w| {
            std::io::copy(&mut std::fs::File::open(file)?, w).map(|_| ())
        })?;
    }
    for (name, text) in [("config.json", &config), ("manifest.json", &manifest)] {
        tar_file(&mut out, name, text.len() as u64, |w| {
            w.write_all(text.as_bytes())
        })?;
    }
    out.write_all(&[0u8; 1024])?;
    out.flush()?;
    drop(out);
    std::fs::remove_dir_all(&dir)?;
    Ok(std::fs::metadata(path)?.len())
}

struct HashingWriter<'a, W> {
    inner: W,
    hasher: &'a mut Sha256,
}

impl<W: std::io::Write> std::io::Write for HashingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

// ---------------------------------------------------------------------------
// The plain TCP proxy.

/// The front's copy without TLS: listens in the host's network namespace
/// on the front's address (another port) and copies each connection to
/// dockerd's socket, on a runtime of its own (two workers, like the
/// agent's on this machine). Dropping it stops the runtime, which closes
/// the listener and every connection.
struct PlainProxy {
    addr: SocketAddr,
    _rt: tokio::runtime::Runtime,
}

impl PlainProxy {
    fn start(netns: &Path, ip: std::net::IpAddr, socket: &Path) -> std::io::Result<Self> {
        let listener = crate::stock::listen_in(Some(netns), SocketAddr::new(ip, 0));
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("berth-bench-plain-proxy")
            .enable_all()
            .build()?;
        let socket = socket.to_owned();
        rt.spawn(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            while let Ok((mut client, _)) = listener.accept().await {
                let socket = socket.clone();
                tokio::spawn(async move {
                    let _ = client.set_nodelay(true);
                    let Ok(mut daemon) = UnixStream::connect(&socket).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional_with_sizes(
                        &mut client,
                        &mut daemon,
                        COPY_BUFFER,
                        COPY_BUFFER,
                    )
                    .await;
                });
            }
        });
        Ok(Self { addr, _rt: rt })
    }
}

// ---------------------------------------------------------------------------
// The comparison dockerd.

/// A dockerd with its own TLS TCP listener in a network namespace of its
/// own, for comparison only. Dropping it destroys it (the agent's sweep of
/// its prefix: processes, mounts, cgroups, namespace, directories).
struct ComparisonDockerd {
    prefix: String,
    state_root: PathBuf,
    run_root: PathBuf,
    addr: SocketAddr,
    client: Arc<rustls::ClientConfig>,
    _child: std::process::Child,
}

impl ComparisonDockerd {
    fn start(prefix: &str) -> std::io::Result<Self> {
        let state_root = Path::new(berth_testkit::TEST_STATE_ROOT).join(format!("{prefix}state"));
        let run_root = Path::new(berth_testkit::TEST_RUN_ROOT).join(format!("{prefix}run"));
        sweep(&state_root, &run_root, prefix);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let block = rt
            .block_on(berth_agent::provider::netns::create_wired(prefix))
            .map_err(|e| io_err(e.to_string()))?;
        let paths =
            berth_agent::docker::dockerd::HostPaths::new(&state_root, &run_root, &block.name);
        let spec = berth_agent::docker::dockerd::DockerdSpec {
            program: PathBuf::from("dockerd"),
            paths: paths.clone(),
            netns: Some(block.path()),
            cgroup_parent: berth_agent::provider::cleanup::cgroup_name(&block.name),
            // Its own namespace, like a pool host's.
            network: berth_agent::provider::hostnet::HostNetwork::Own,
            dns: berth_agent::provider::hostnet::HostDns::OwnAddress(block.host_addr.into()),
            registries: Default::default(),
        };
        for d in [
            &paths.host_dir,
            &paths.run_dir,
            &paths.data_root,
            &paths.exec_root,
        ] {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(&paths.config_file, b"{}\n")?;

        // Its own small PKI: server certificate for its address, one client.
        let err = |e: berth_tls::TlsError| io_err(e.to_string());
        let (ca, _) = berth_tls::Ca::generate("bench CA").map_err(err)?;
        let server = berth_tls::KeyAndCsr::generate("bench dockerd").map_err(err)?;
        let ip = std::net::IpAddr::V4(block.host_addr);
        let now = SystemTime::now();
        let server_cert = ca
            .sign_host(&server.csr_pem, &block.name, ip, now)
            .map_err(err)?;
        let client = berth_tls::KeyAndCsr::generate("bench client").map_err(err)?;
        let client_cert = ca
            .sign_lease(
                &client.csr_pem,
                "bench",
                now,
                now + Duration::from_secs(86400),
            )
            .map_err(err)?;
        let tls_dir = paths.host_dir.join("tls");
        std::fs::create_dir_all(&tls_dir)?;
        for (f, pem) in [
            ("ca.pem", ca.cert_pem()),
            ("server-cert.pem", &server_cert),
            ("server-key.pem", &server.key_pem),
        ] {
            std::fs::write(tls_dir.join(f), pem)?;
        }
        let addr = SocketAddr::new(ip, 2376);
        let (program, mut args) = spec.command_line();
        args.extend([
            "--tlsverify".to_owned(),
            format!("--tlscacert={}", tls_dir.join("ca.pem").display()),
            format!("--tlscert={}", tls_dir.join("server-cert.pem").display()),
            format!("--tlskey={}", tls_dir.join("server-key.pem").display()),
            format!("--host=tcp://{addr}"),
        ]);
        let log = std::fs::File::create(&paths.log)?;
        let child = std::process::Command::new(program)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let config = berth_tls::lease_client_config(ca.cert_pem(), &client_cert, &client.key_pem)
            .map_err(err)?;
        let me = Self {
            prefix: prefix.to_owned(),
            state_root,
            run_root,
            addr,
            client: config,
            _child: child,
        };
        // Ready when its TLS listener answers /_ping.
        let deadline = Instant::now() + DOCKERD_START_TIMEOUT;
        loop {
            let t = me.target()?;
            let ok = rt.block_on(async {
                match t.connect().await {
                    Ok(mut c) => c.get("GET", "/_ping").await.is_ok_and(|r| r.status == 200),
                    Err(_) => false,
                }
            });
            if ok {
                break;
            }
            if Instant::now() > deadline {
                let tail = berth_agent::docker::dockerd::log_tail(&paths.log);
                return Err(io_err(format!(
                    "the comparison dockerd did not answer on {addr} within {DOCKERD_START_TIMEOUT:?}:\n{tail}"
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(me)
    }

    fn target(&self) -> std::io::Result<Target> {
        Ok(Target::Tls {
            addr: self.addr,
            config: self.client.clone(),
        })
    }
}

impl Drop for ComparisonDockerd {
    fn drop(&mut self) {
        sweep(&self.state_root, &self.run_root, &self.prefix);
        // Its directories hold nothing the report needs (a failed start
        // quotes its log in the error).
        berth_testkit::remove_dirs_if_passed(&[&self.state_root, &self.run_root]);
    }
}

fn sweep(state_root: &Path, run_root: &Path, prefix: &str) {
    let (s, r, p) = (
        state_root.to_owned(),
        run_root.to_owned(),
        prefix.to_owned(),
    );
    // Its own thread and runtime: callers may be inside a runtime or not.
    let result = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(berth_agent::sweep(&s, &r, &p))
            .map_err(|e| e.to_string())
    })
    .join();
    if let Ok(Err(e)) | Err(e) = result.map_err(|_| "sweep thread panicked".to_owned()) {
        eprintln!("berth-bench: sweeping {prefix}: {e}");
    }
}

// ---------------------------------------------------------------------------

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.options;
        writeln!(f, "TLS front benchmark")?;
        writeln!(f, "machine: {}", self.machine)?;
        writeln!(
            f,
            "dockerd {}; image {:.0} MiB in {} random layers; {} bulk rounds per path; {} sequential /_ping per path; {} new connections per path",
            self.docker_version,
            self.image_bytes as f64 / 1048576.0,
            o.layers,
            o.rounds,
            o.requests,
            o.connects
        )?;
        let table = |f: &mut fmt::Formatter<'_>,
                     title: &str,
                     pick: &dyn Fn(&PathFigures) -> Summary,
                     prec: usize|
         -> fmt::Result {
            writeln!(f, "\n{title}")?;
            writeln!(
                f,
                "  {:<22} {:>10} {:>10} {:>10} {:>10}",
                "path", "min", "median", "p99", "max"
            )?;
            for p in &self.paths {
                let s = pick(p);
                writeln!(
                    f,
                    "  {:<22} {:>10.prec$} {:>10.prec$} {:>10.prec$} {:>10.prec$}",
                    p.name, s.min, s.median, s.p99, s.max
                )?;
            }
            Ok(())
        };
        table(
            f,
            "bulk upload, POST /images/load (docker load), MiB/s",
            &|p| p.load,
            1,
        )?;
        table(
            f,
            "bulk download, GET /images/NAME/get (docker save), MiB/s",
            &|p| p.save,
            1,
        )?;
        table(
            f,
            "sequential GET /_ping on one keep-alive connection, ms",
            &|p| p.ping,
            3,
        )?;
        table(f, "new connection + GET /_ping, ms", &|p| p.connect_ping, 3)?;
        if let (Some(u), Some(fr), Some(d), Some(p)) = (
            self.path(UNIX),
            self.path(FRONT),
            self.path(DOCKERD_TLS),
            self.path(PLAIN),
        ) {
            writeln!(f, "\nratios (medians)")?;
            for (label, top, base) in [
                ("front / unix socket:", fr, u),
                ("front / dockerd TLS:", fr, d),
                ("front / plain TCP proxy:", fr, p),
                ("plain TCP proxy / unix:", p, u),
            ] {
                writeln!(
                    f,
                    "  {label:<24} load {:.2}x, save {:.2}x",
                    top.load.median / base.load.median,
                    top.save.median / base.save.median
                )?;
            }
            writeln!(
                f,
                "  added p50 latency per /_ping over the unix socket: front {:+.3} ms, dockerd TLS {:+.3} ms",
                fr.ping.median - u.ping.median,
                d.ping.median - u.ping.median
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_headers_have_valid_checksums() {
        let h = tar_header("layer0/layer.tar", 1234);
        let stored = std::str::from_utf8(&h[148..154]).unwrap();
        let mut copy = h;
        copy[148..156].fill(b' ');
        let sum: u32 = copy.iter().map(|&b| u32::from(b)).sum();
        assert_eq!(u32::from_str_radix(stored, 8).unwrap(), sum);
        assert_eq!(std::str::from_utf8(&h[124..135]).unwrap(), "00000002322");
        assert_eq!(pad(1234), 512 - 1234 % 512);
        assert_eq!(pad(1024), 0);
    }

    #[test]
    fn image_tar_has_layers_config_and_manifest() {
        let dir = std::env::temp_dir().join(format!("berth-bench-tar-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tar = dir.join("i.tar");
        let size = write_image_tar(&tar, 3000, 2).unwrap();
        let bytes = std::fs::read(&tar).unwrap();
        assert_eq!(bytes.len() as u64, size);
        assert_eq!(size % 512, 0);
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("layer1/layer.tar") && text.contains("manifest.json"));
        assert!(text.contains(IMAGE) && text.contains("\"diff_ids\":[\"sha256:"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
