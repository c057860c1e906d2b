//! The pool's pull-through mirror behind a slow upstream: a pull on a
//! brand-new host through a warm mirror, against the pull of the same
//! image across the WAN link, in the same run and on the same pool.
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
//! 1. a lease on a fresh host pulls the round's image by its Docker Hub
//!    style name: the mirror has none of it and streams every blob from the
//!    upstream through the shaped link while storing it (the baseline: the
//!    pull across the WAN link);
//! 2. the lease is released, and a lease on another fresh host pulls the
//!    same image: the warm mirror serves it from its storage.
//!
//! Why the baseline goes through the (cold) mirror rather than straight to
//! the upstream: a host's namespace reaches the machine's own addresses
//! only (the machine forwards nothing between namespaces), and the
//! upstream lives in a namespace of its own. The cold pull carries the
//! same bytes over the same shaped link, the mirror copying them as they
//! come; what it adds is the mirror's hop on the machine. That the warm
//! pull fetched nothing from the upstream is checked with the mirror's
//! miss counter (`berth status`'s, from the coordinator). distribution
//! 2.8's proxy fetches each missed blob twice (once streamed to the
//! client, once into its storage), so the cold pull moves about twice the
//! image across the link: the report counts those bytes (tc's counter).
//!
//! Timed: the whole `docker pull` command, as a CI step pays it. Right
//! after each, the same pull again on the same host (the image is there:
//! nothing is transferred) is timed too: what every pull costs before any
//! transfer (the client's round trips, dockerd's lookup of `docker.io`, the
//! manifest from the mirror). The report shows the speedup both as
//! measured and net of that fixed cost. Before local hosts had a resolver
//! of their own (`provider::hostnet`, rule 3) that cost was about 10 s:
//! dockerd's lookup of `docker.io` waited for two 5 s timeouts against the
//! machine's resolver, which a host's namespace cannot reach.

use std::fmt;
use std::path::Path;
use std::time::Instant;

use super::Summary;
use crate::registry::{Upstream, pseudo_random};
use berth_proto::v1 as pb;
use berth_testkit::{Pool, busybox_context, run as run_cmd, stderr, test_prefix};

/// What to measure.
#[derive(Debug, Clone)]
pub struct Options {
    /// Layers of incompressible data in the image, besides the busybox.
    pub layers: usize,
    /// Size of each of those layers, MiB.
    pub layer_mib: usize,
    /// The upstream link's rate, as `tc` reads it.
    pub rate: String,
    /// Rounds (each: an image of its own, two fresh hosts).
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
    /// The pull on a fresh host with nothing cached: across the link.
    pub cold: Summary,
    /// The pull on another fresh host from the warm mirror.
    pub warm: Summary,
    /// A pull of an image the host already has: the fixed cost of a pull.
    pub noop: Summary,
    /// Bytes the upstream's link sent per cold pull (median), MiB.
    pub cold_link_mib: f64,
    /// Whether no warm pull fetched anything from the upstream (the
    /// mirror's misses did not move).
    pub warm_from_mirror_only: bool,
}

impl Report {
    /// How many times faster the pull from the warm mirror is (medians).
    pub fn speedup(&self) -> f64 {
        self.cold.median / self.warm.median
    }

    /// The same, net of the fixed cost of a pull (the median no-op pull).
    pub fn net_speedup(&self) -> f64 {
        (self.cold.median - self.noop.median) / (self.warm.median - self.noop.median).max(1e-3)
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

/// The mirror's misses, as `berth status` shows them.
fn mirror_misses(pool: &Pool) -> std::io::Result<u64> {
    let stats: pb::PoolStatsResponse = pool.pool_stats();
    stats
        .registries
        .iter()
        .find(|r| r.name == "mirror" && r.counters_read)
        .map(|r| r.misses)
        .ok_or_else(|| io_err(format!("no mirror counters: {:?}", stats.registries)))
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
    let (mut cold, mut warm) = (vec![], vec![]);
    let mut warm_from_mirror_only = true;
    let pull = |lease: &berth_testkit::LeaseEnv, image: &str| -> std::io::Result<f64> {
        let started = Instant::now();
        let o = run_cmd(lease.docker().args(["pull", "-q", image]));
        if !o.status.success() {
            return Err(io_err(format!("docker pull {image}: {}", stderr(&o))));
        }
        Ok(started.elapsed().as_secs_f64())
    };
    let mut noop = vec![];
    // The pull timed, then the same pull again (nothing to transfer).
    let pulls = |lease: &berth_testkit::LeaseEnv, image: &str| {
        let result = pull(lease, image).and_then(|t| Ok((t, pull(lease, image)?)));
        let _ = pool.berth(&["release", "--lease", lease.lease_id()]);
        result
    };
    let mut link = vec![];
    for (round, image) in images.iter().enumerate() {
        let first = pool.acquire(&format!("bench-mirror-{round}-a"), "1h", "2m");
        let sent = upstream.link_bytes_sent();
        let (t, again) = pulls(&first, image)?;
        #[allow(clippy::cast_precision_loss)]
        link.push((upstream.link_bytes_sent() - sent) as f64 / f64::from(1u32 << 20));
        cold.push(t);
        noop.push(again);
        let misses = mirror_misses(&pool)?;
        let second = pool.acquire(&format!("bench-mirror-{round}-b"), "1h", "2m");
        let (t, again) = pulls(&second, image)?;
        warm.push(t);
        noop.push(again);
        warm_from_mirror_only &= mirror_misses(&pool)? == misses;
    }
    let sum = |v: &[f64]| Summary::of(v).ok_or_else(|| io_err("no rounds".into()));
    #[allow(clippy::cast_precision_loss)]
    let image_mib = blobs as f64 / opts.rounds.max(1) as f64 / f64::from(1u32 << 20);
    Ok(Report {
        machine: super::machine(),
        options: opts.clone(),
        image_mib,
        cold: sum(&cold)?,
        warm: sum(&warm)?,
        noop: sum(&noop)?,
        cold_link_mib: sum(&link)?.median,
        warm_from_mirror_only,
    })
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "registry mirror benchmark")?;
        writeln!(f, "machine: {}", self.machine)?;
        writeln!(
            f,
            "image: busybox + {} layers of {} MiB (about {:.0} MiB in the registry); upstream link: tbf rate {}; {} rounds, each an image of its own on two fresh hosts; seconds, `docker pull` timed",
            self.options.layers,
            self.options.layer_mib,
            self.image_mib,
            self.options.rate,
            self.options.rounds
        )?;
        super::write_table(
            f,
            &[
                ("pull across the link (cold mirror)", &self.cold),
                ("pull from the warm mirror", &self.warm),
                ("pull of an image already there (fixed cost)", &self.noop),
            ],
        )?;
        writeln!(
            f,
            "\nsent across the link per cold pull (median): {:.0} MiB",
            self.cold_link_mib
        )?;
        writeln!(
            f,
            "warm pulls fetched nothing from the upstream: {}",
            self.warm_from_mirror_only
        )?;
        writeln!(
            f,
            "speedup (medians, across the link / warm mirror): {:.2}x",
            self.speedup()
        )?;
        writeln!(
            f,
            "net of the fixed cost (medians minus the no-op pull's): {:.2}x",
            self.net_speedup()
        )
    }
}
