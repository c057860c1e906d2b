//! The pool's pull-through mirror behind a slow upstream: a pull on a
//! brand-new host through a warm mirror, against the pull of the same
//! image on a brand-new host straight from the upstream (the issue's
//! baseline: the pool without a mirror), in the same run and on the same
//! pool; and against the pull through the cold mirror.
//!
//! The upstream is CNCF distribution in a network namespace of the
//! benchmark's own (`crate::registry::Upstream`), its link shaped with a
//! token bucket (`tc qdisc ... tbf rate 100mbit`; this kernel has no
//! netem, so the link has the bandwidth of a WAN and no added delay). It
//! holds a multi-layer image `FROM scratch` (the static busybox and
//! `layers` layers of `layer_mib` MiB of incompressible bytes); every round
//! has an image of its own (other bytes), so its first pull finds nothing
//! cached:
//!
//! 1. a lease on a fresh host pulls the round's image straight from the
//!    upstream, by the upstream's own address (`ADDR:PORT/REPO:TAG`), as a
//!    user without the mirror pulls from that registry: the host's dockerd
//!    trusts the upstream's CA through `certs.d` in the host's own
//!    directory, and the host's namespace gets a link of its own to the
//!    upstream's, shaped like the upstream's link to the machine
//!    ([`Upstream::link_host`]: the machine forwards nothing between
//!    namespaces, so a host cannot reach the upstream through it). That
//!    this pull did not go through the mirror is checked twice: the
//!    mirror's blob requests and bytes served did not move (`berth
//!    status`'s counters, from the coordinator), and the upstream's log
//!    shows the host's own address fetching the manifest and the blobs;
//! 2. the lease is released, and a lease on another fresh host pulls the
//!    same image by its Docker Hub style name: the mirror has none of it
//!    and streams every blob from the upstream through the shaped link
//!    while storing it (the cold mirror);
//! 3. that lease is released, and a lease on a third fresh host pulls the
//!    same image: the warm mirror serves it from its storage. That it
//!    fetched nothing from the upstream is checked with the mirror's miss
//!    counter.
//!
//! distribution 2.8's proxy fetches each missed blob twice (once streamed
//! to the client, once into its storage), so the cold pull moves about
//! twice the image across the link, the direct pull once: the report
//! counts the bytes of both (tc's counters on each link).
//!
//! Timed: the whole `docker pull` command, as a CI step pays it. Right
//! after each, the same pull again on the same host (the image is there:
//! nothing is transferred) is timed too: what every pull costs before any
//! transfer (the client's round trips, dockerd's lookup of `docker.io` for
//! a Docker Hub name, the manifest). The report shows the speedup both as
//! measured and net of that fixed cost. Before local hosts had a resolver
//! of their own (`provider::hostnet`, rule 3) that cost was about 10 s for
//! a Docker Hub name: dockerd's lookup of `docker.io` waited for two 5 s
//! timeouts against the machine's resolver, which a host's namespace
//! cannot reach.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Instant;

use super::Summary;
use crate::registry::{Upstream, pseudo_random, served};
use berth_agent::docker::dockerd::HostPaths;
use berth_agent::docker::registries::{CA_FILE, certs_dir};
use berth_proto::v1 as pb;
use berth_testkit::{LeaseEnv, Pool, busybox_context, run as run_cmd, stderr, test_prefix};

/// The target: a pull through the warm mirror at least this many
/// times faster than the same pull straight from the upstream (medians).
pub const TARGET: f64 = 5.0;

/// What to measure.
#[derive(Debug, Clone)]
pub struct Options {
    /// Layers of incompressible data in the image, besides the busybox.
    pub layers: usize,
    /// Size of each of those layers, MiB.
    pub layer_mib: usize,
    /// The upstream link's rate, as `tc` reads it.
    pub rate: String,
    /// Rounds (each: an image of its own, three fresh hosts).
    pub rounds: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            layers: 8,
            layer_mib: 25,
            rate: "100mbit".into(),
            rounds: 3,
        }
    }
}

impl Options {
    pub fn smoke() -> Self {
        Self {
            layers: 2,
            layer_mib: 1,
            rate: "100mbit".into(),
            rounds: 1,
        }
    }
}

/// What [`run`] measured, seconds per round.
#[derive(Debug, Clone)]
pub struct Report {
    pub machine: String,
    pub options: Options,
    /// The image's size as the registry holds it (compressed layers), MiB.
    pub image_mib: f64,
    /// The pull on a fresh host straight from the upstream, no mirror: the
    /// baseline.
    pub direct: Summary,
    /// The pull on a fresh host through the mirror with nothing cached.
    pub cold: Summary,
    /// The pull on another fresh host from the warm mirror.
    pub warm: Summary,
    /// A pull of an image the host already has: the fixed cost of a pull.
    pub noop: Summary,
    /// Bytes the upstream sent to the host per direct pull (median), MiB.
    pub direct_link_mib: f64,
    /// Bytes the upstream's link sent per cold pull (median), MiB.
    pub cold_link_mib: f64,
    /// Whether every direct pull went straight to the upstream: the
    /// mirror's requests and bytes served did not move, and the upstream
    /// served the manifest and blobs to the host's own address.
    pub direct_without_mirror: bool,
    /// Whether no warm pull fetched anything from the upstream (the
    /// mirror's misses did not move).
    pub warm_from_mirror_only: bool,
}

impl Report {
    /// How many times faster the pull from the warm mirror is than the
    /// pull straight from the upstream (medians): the ratio.
    pub fn speedup(&self) -> f64 {
        self.direct.median / self.warm.median
    }

    /// Whether [`Report::speedup`] meets [`TARGET`].
    pub fn target_met(&self) -> bool {
        self.speedup() >= TARGET
    }

    /// How many times faster the pull from the warm mirror is than the pull
    /// through the cold mirror (medians).
    pub fn speedup_over_cold(&self) -> f64 {
        self.cold.median / self.warm.median
    }

    /// `baseline` over the warm pull, net of the fixed cost of a pull (the
    /// median no-op pull).
    fn net(&self, baseline: &Summary) -> f64 {
        (baseline.median - self.noop.median) / (self.warm.median - self.noop.median).max(1e-3)
    }

    /// [`Report::speedup`] net of the fixed cost of a pull.
    pub fn net_speedup(&self) -> f64 {
        self.net(&self.direct)
    }

    /// [`Report::speedup_over_cold`] net of the fixed cost of a pull.
    pub fn net_speedup_over_cold(&self) -> f64 {
        self.net(&self.cold)
    }
}

fn io_err(what: String) -> std::io::Error {
    std::io::Error::other(what)
}

/// The image of round `round`: the busybox, and `layers` layers of
/// pseudo-random bytes seeded by the round.
fn context(dir: &Path, opts: &Options, round: usize) {
    busybox_context(dir, "bench\n");
    let mut dockerfile = String::from(
        "FROM scratch\n\
         COPY busybox /bin/busybox\n\
         RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n",
    );
    for i in 0..opts.layers {
        let name = format!("layer{i}.bin");
        let seed = (round as u64 + 1) * 1000 + i as u64;
        std::fs::write(dir.join(&name), pseudo_random(seed, opts.layer_mib << 20))
            .unwrap_or_else(|e| panic!("writing the image's data: {e}"));
        dockerfile.push_str(&format!("COPY {name} /data/{name}\n"));
    }
    std::fs::write(dir.join("Dockerfile"), dockerfile)
        .unwrap_or_else(|e| panic!("writing the Dockerfile: {e}"));
}

/// The mirror's counters, as `berth status` shows them.
fn mirror_counters(pool: &Pool) -> std::io::Result<pb::RegistryStatus> {
    let stats: pb::PoolStatsResponse = pool.pool_stats();
    stats
        .registries
        .iter()
        .find(|r| r.name == "mirror" && r.counters_read)
        .cloned()
        .ok_or_else(|| io_err(format!("no mirror counters: {:?}", stats.registries)))
}

/// Makes the lease's host pull straight from `upstream`, as a Docker host
/// outside the pool would: its dockerd trusts the upstream's CA through
/// `certs.d` in the host's own directory (its `/etc/docker`; dockerd reads
/// it on every pull), and its namespace gets a link of its own to the
/// upstream's, named `dev`, shaped to `rate`. Returns the host's address.
fn link_straight(
    pool: &Pool,
    upstream: &Upstream,
    lease: &LeaseEnv,
    dev: &str,
    rate: &str,
) -> std::io::Result<Ipv4Addr> {
    let host_id = lease.get("BERTH_HOST_ID");
    let host_addr: Ipv4Addr = lease
        .host_addr()
        .parse()
        .map_err(|e| io_err(format!("host address {:?}: {e}", lease.host_addr())))?;
    let paths = HostPaths::new(&pool.state_dir.join("hosts"), &pool.run_dir, host_id);
    let dir = certs_dir(&paths.etc_docker, &upstream.addr.to_string());
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(&upstream.ca_file, dir.join(CA_FILE))?;
    upstream.link_host(host_id, host_addr, dev, rate);
    Ok(host_addr)
}

/// `docker pull -q IMAGE` on the lease, timed (seconds).
fn timed_pull(lease: &LeaseEnv, image: &str) -> std::io::Result<f64> {
    let started = Instant::now();
    let o = run_cmd(lease.docker().args(["pull", "-q", image]));
    if !o.status.success() {
        return Err(io_err(format!("docker pull {image}: {}", stderr(&o))));
    }
    Ok(started.elapsed().as_secs_f64())
}

/// What one pull straight from the upstream measured.
struct Straight {
    secs: f64,
    /// The same pull again (the image is there).
    again: f64,
    /// Bytes the upstream sent to the host during the pull, MiB.
    link_mib: f64,
    /// The mirror's requests and bytes served did not move, and the
    /// upstream served the manifest and blobs to the host's address.
    without_mirror: bool,
}

/// Round `round`'s pull of `image` on the lease's host straight from the
/// upstream, by the upstream's own address (see [`link_straight`]).
fn pull_straight(
    pool: &Pool,
    upstream: &Upstream,
    lease: &LeaseEnv,
    image: &str,
    round: usize,
    rate: &str,
) -> std::io::Result<Straight> {
    let dev = format!("bdl{round}");
    let host = link_straight(pool, upstream, lease, &dev, rate)?.to_string();
    let reference = format!("{}/{image}", upstream.addr);
    let before = mirror_counters(pool)?;
    let log_before = upstream.registry_log().len();
    let sent = upstream.link_bytes_sent_on(&dev);
    let secs = timed_pull(lease, &reference)?;
    #[allow(clippy::cast_precision_loss)]
    let link_mib =
        upstream.link_bytes_sent_on(&dev).saturating_sub(sent) as f64 / f64::from(1u32 << 20);
    let again = timed_pull(lease, &reference)?;
    let after = mirror_counters(pool)?;
    let log = upstream.registry_log();
    let log = log.get(log_before..).unwrap_or_default();
    let repo = image.split(':').next().unwrap_or(image);
    let without_mirror = after.requests == before.requests
        && after.bytes_served == before.bytes_served
        && served(log, &host, &format!("/v2/{repo}/manifests/"))
        && served(log, &host, &format!("/v2/{repo}/blobs/"));
    Ok(Straight {
        secs,
        again,
        link_mib,
        without_mirror,
    })
}

/// Runs the benchmark with an upstream and a pool of its own (torn down
/// after).
pub fn run(opts: &Options) -> std::io::Result<Report> {
    crate::registry::registry_bin();
    let mut upstream = Upstream::start(&test_prefix("bmu-"));
    let images: Vec<String> = (0..opts.rounds)
        .map(|r| format!("berthbench/app:r{r}"))
        .collect();
    let scratch = upstream
        .helper_socket()
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| io_err("no scratch directory".into()))?;
    for (round, image) in images.iter().enumerate() {
        let ctx = scratch.join(format!("ctx-{round}"));
        context(&ctx, opts, round);
        upstream.push(&ctx, image);
        let _ = std::fs::remove_dir_all(&ctx);
    }
    upstream.stop_helper();
    let blobs = upstream.data_bytes();
    upstream.shape(&opts.rate);
    let pool = Pool::start(
        "bmm-",
        2,
        &[
            "--mirror-upstream",
            &format!("https://{}", upstream.addr),
            "--mirror-upstream-ca",
            &upstream.ca_file.to_string_lossy(),
        ],
    );
    let (mut direct, mut cold, mut warm) = (vec![], vec![], vec![]);
    let (mut direct_without_mirror, mut warm_from_mirror_only) = (true, true);
    let mut noop = vec![];
    // The pull timed, then the same pull again (nothing to transfer).
    let pulls = |lease: &LeaseEnv, image: &str| {
        let result = timed_pull(lease, image).and_then(|t| Ok((t, timed_pull(lease, image)?)));
        let _ = pool.berth(&["release", "--lease", lease.lease_id()]);
        result
    };
    let (mut direct_link, mut cold_link) = (vec![], vec![]);
    for (round, image) in images.iter().enumerate() {
        // Straight from the upstream, by its own address.
        let lease = pool.acquire(&format!("bench-mirror-{round}-direct"), "1h", "2m");
        let result = pull_straight(&pool, &upstream, &lease, image, round, &opts.rate);
        let _ = pool.berth(&["release", "--lease", lease.lease_id()]);
        let d = result?;
        direct.push(d.secs);
        noop.push(d.again);
        direct_link.push(d.link_mib);
        direct_without_mirror &= d.without_mirror;

        // Through the cold mirror, by the Docker Hub style name.
        let lease = pool.acquire(&format!("bench-mirror-{round}-a"), "1h", "2m");
        let sent = upstream.link_bytes_sent();
        let (t, again) = pulls(&lease, image)?;
        #[allow(clippy::cast_precision_loss)]
        cold_link.push((upstream.link_bytes_sent() - sent) as f64 / f64::from(1u32 << 20));
        cold.push(t);
        noop.push(again);

        // From the warm mirror.
        let misses = mirror_counters(&pool)?.misses;
        let lease = pool.acquire(&format!("bench-mirror-{round}-b"), "1h", "2m");
        let (t, again) = pulls(&lease, image)?;
        warm.push(t);
        noop.push(again);
        warm_from_mirror_only &= mirror_counters(&pool)?.misses == misses;
    }
    let sum = |v: &[f64]| Summary::of(v).ok_or_else(|| io_err("no rounds".into()));
    #[allow(clippy::cast_precision_loss)]
    let image_mib = blobs as f64 / opts.rounds.max(1) as f64 / f64::from(1u32 << 20);
    Ok(Report {
        machine: super::machine(),
        options: opts.clone(),
        image_mib,
        direct: sum(&direct)?,
        cold: sum(&cold)?,
        warm: sum(&warm)?,
        noop: sum(&noop)?,
        direct_link_mib: sum(&direct_link)?.median,
        cold_link_mib: sum(&cold_link)?.median,
        direct_without_mirror,
        warm_from_mirror_only,
    })
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "registry mirror benchmark")?;
        writeln!(f, "machine: {}", self.machine)?;
        writeln!(
            f,
            "image: busybox + {} layers of {} MiB (about {:.0} MiB in the registry); upstream link: tbf rate {}; {} rounds, each an image of its own on three fresh hosts; seconds, `docker pull` timed",
            self.options.layers,
            self.options.layer_mib,
            self.image_mib,
            self.options.rate,
            self.options.rounds
        )?;
        super::write_table(
            f,
            &[
                ("pull straight from the upstream (no mirror)", &self.direct),
                ("pull through the cold mirror", &self.cold),
                ("pull from the warm mirror", &self.warm),
                ("pull of an image already there (fixed cost)", &self.noop),
            ],
        )?;
        writeln!(
            f,
            "\nsent across the link per direct pull (median): {:.0} MiB",
            self.direct_link_mib
        )?;
        writeln!(
            f,
            "sent across the link per cold mirror pull (median): {:.0} MiB",
            self.cold_link_mib
        )?;
        writeln!(
            f,
            "direct pulls went straight to the upstream (mirror's counters unchanged, the upstream served the host): {}",
            self.direct_without_mirror
        )?;
        writeln!(
            f,
            "warm pulls fetched nothing from the upstream: {}",
            self.warm_from_mirror_only
        )?;
        writeln!(
            f,
            "speedup (medians, straight from the upstream / warm mirror): {}x",
            super::fmt(self.speedup())
        )?;
        writeln!(
            f,
            "target: >= {TARGET:.0}x faster than straight from the upstream: {}",
            if self.target_met() { "MET" } else { "NOT MET" }
        )?;
        writeln!(
            f,
            "over the cold mirror (medians, cold mirror / warm mirror): {}x",
            super::fmt(self.speedup_over_cold())
        )?;
        writeln!(
            f,
            "net of the fixed cost (medians minus the no-op pull's): {}x straight from the upstream, {}x over the cold mirror",
            super::fmt(self.net_speedup()),
            super::fmt(self.net_speedup_over_cold())
        )
    }
}
