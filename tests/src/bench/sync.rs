//! `berth sync` against `docker cp`, on the same tree, the same lease and
//! the same host in one run: both go through the agent's mutual-TLS front
//! into a named volume, so the difference is the clients (berth's tar
//! writer and HTTP client against the docker CLI's).
//!
//! - **to the volume**: `berth sync TREE --volume V` against `docker cp
//!   TREE/. C:/data`, where `C` is a created (never started) container with
//!   a fresh volume mounted at `/data` — what a CI user would do by hand.
//! - **back**: `berth sync --from V DEST` against `docker cp C:/data/. DEST`.
//!
//! Each round uses fresh volumes and destinations, and the two tools
//! alternate within a round, so drift hits both. Timed: the whole command,
//! process start included (what a CI step pays). The tree is random
//! (incompressible) data: a few large files and many small ones in nested
//! directories.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use rand::RngCore;

use super::Summary;
use berth_testkit::{LeaseEnv, Pool, bin, busybox_context, run as run_cmd, stderr};

/// What to measure.
#[derive(Debug, Clone)]
pub struct Options {
    /// Total size of the tree, MiB.
    pub tree_mib: u64,
    /// Number of files; half the bytes go to `large_files` of them, the
    /// other half is spread over the rest.
    pub files: usize,
    pub large_files: usize,
    /// Rounds per tool and direction.
    pub rounds: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            tree_mib: 200,
            files: 2000,
            large_files: 20,
            rounds: 3,
        }
    }
}

/// What [`run`] measured, MiB/s per round.
#[derive(Debug, Clone)]
pub struct Report {
    pub machine: String,
    pub options: Options,
    pub tree_bytes: u64,
    pub files: usize,
    pub berth_to: Summary,
    pub docker_cp_to: Summary,
    pub berth_from: Summary,
    pub docker_cp_from: Summary,
}

impl Report {
    /// berth's median throughput over docker cp's, to the volume.
    pub fn ratio_to(&self) -> f64 {
        self.berth_to.median / self.docker_cp_to.median
    }

    /// The same, copying back.
    pub fn ratio_from(&self) -> f64 {
        self.berth_from.median / self.docker_cp_from.median
    }
}

fn io_err(what: String) -> std::io::Error {
    std::io::Error::other(what)
}

/// Writes the benchmark tree; returns (bytes, files).
pub fn write_tree(root: &Path, opts: &Options) -> std::io::Result<(u64, usize)> {
    let _ = std::fs::remove_dir_all(root);
    let total = opts.tree_mib * 1024 * 1024;
    let large = opts.large_files.min(opts.files);
    let small = opts.files - large;
    let large_size = if large > 0 {
        total / 2 / large as u64
    } else {
        0
    };
    let small_size = if small > 0 {
        (total - large_size * large as u64) / small as u64
    } else {
        0
    };
    let mut rng = rand::rng();
    let mut buf = Vec::new();
    let mut bytes = 0;
    for i in 0..opts.files {
        let dir = root.join(format!("pkg{}/mod{}", i % 16, (i / 16) % 8));
        std::fs::create_dir_all(&dir)?;
        let size = if i < large { large_size } else { small_size };
        buf.resize(usize::try_from(size).map_err(|e| io_err(e.to_string()))?, 0);
        rng.fill_bytes(&mut buf);
        std::fs::write(dir.join(format!("f{i}.bin")), &buf)?;
        bytes += size;
    }
    Ok((bytes, opts.files))
}

fn timed(cmd: &mut Command, what: &str) -> std::io::Result<f64> {
    let started = Instant::now();
    let o = run_cmd(cmd);
    let secs = started.elapsed().as_secs_f64();
    if !o.status.success() {
        return Err(io_err(format!("{what} failed: {}", stderr(&o))));
    }
    Ok(secs)
}

fn berth(pool: &Pool, lease: &LeaseEnv) -> Command {
    let mut c = Command::new(bin("berth"));
    for k in ["DOCKER_HOST", "DOCKER_CERT_PATH", "BERTH_LEASE_ID"] {
        c.env(k, lease.get(k));
    }
    c.env("HOME", pool.state_dir.join("home"));
    c
}

fn docker_ok(lease: &LeaseEnv, args: &[&str]) -> std::io::Result<String> {
    let o = run_cmd(lease.docker().args(args));
    if !o.status.success() {
        return Err(io_err(format!("docker {args:?}: {}", stderr(&o))));
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned())
}

/// Runs the benchmark on a one-host pool of its own (torn down after).
pub fn run(opts: &Options) -> std::io::Result<Report> {
    let pool = Pool::start("bms-", 1, &[]);
    let lease = pool.acquire("bench-sync", "2h", "1m");
    let result = measure(&pool, &lease, opts);
    let _ = pool.berth(&["release", "--lease", lease.lease_id()]);
    result
}

fn measure(pool: &Pool, lease: &LeaseEnv, opts: &Options) -> std::io::Result<Report> {
    let scratch = pool.state_dir.join("bench-sync");
    let tree = scratch.join("tree");
    let (tree_bytes, files) = write_tree(&tree, opts)?;
    let mib = tree_bytes as f64 / (1024.0 * 1024.0);

    // The image docker cp's container is made from: busybox FROM scratch.
    let ctx = scratch.join("ctx");
    busybox_context(&ctx, "bench\n");
    docker_ok(
        lease,
        &[
            "build",
            "-q",
            "-t",
            "bench-cp",
            ctx.to_str().unwrap_or_default(),
        ],
    )?;

    let (mut berth_to, mut cp_to, mut berth_from, mut cp_from) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..opts.rounds {
        // berth sync, into a fresh volume, and back into a fresh directory.
        let vol = format!("bench-berth-{round}");
        let secs = timed(
            berth(pool, lease)
                .args(["sync", "--volume", &vol])
                .arg(&tree),
            "berth sync",
        )?;
        berth_to.push(mib / secs);
        let dest: PathBuf = scratch.join(format!("berth-back-{round}"));
        let secs = timed(
            berth(pool, lease).args(["sync", "--from", &vol]).arg(&dest),
            "berth sync --from",
        )?;
        berth_from.push(mib / secs);
        let _ = std::fs::remove_dir_all(&dest);
        docker_ok(lease, &["volume", "rm", &vol])?;

        // docker cp into a created container mounting a fresh volume.
        let vol = format!("bench-cp-{round}");
        let ctr = docker_ok(
            lease,
            &["create", "-v", &format!("{vol}:/data"), "bench-cp", "true"],
        )?;
        let src = format!("{}/.", tree.display());
        let secs = timed(
            lease
                .docker()
                .args(["cp", "-q", &src, &format!("{ctr}:/data")]),
            "docker cp to the volume",
        )?;
        cp_to.push(mib / secs);
        let dest = scratch.join(format!("cp-back-{round}"));
        std::fs::create_dir_all(&dest)?;
        let secs = timed(
            lease.docker().args([
                "cp",
                "-q",
                &format!("{ctr}:/data/."),
                dest.to_str().unwrap_or_default(),
            ]),
            "docker cp from the volume",
        )?;
        cp_from.push(mib / secs);
        let _ = std::fs::remove_dir_all(&dest);
        docker_ok(lease, &["rm", "-f", &ctr])?;
        docker_ok(lease, &["volume", "rm", &vol])?;
    }
    let _ = std::fs::remove_dir_all(&tree);
    let sum = |v: &[f64]| Summary::of(v).ok_or_else(|| io_err("no rounds".into()));
    Ok(Report {
        machine: super::machine(),
        options: opts.clone(),
        tree_bytes,
        files,
        berth_to: sum(&berth_to)?,
        docker_cp_to: sum(&cp_to)?,
        berth_from: sum(&berth_from)?,
        docker_cp_from: sum(&cp_from)?,
    })
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "sync benchmark")?;
        writeln!(f, "machine: {}", self.machine)?;
        writeln!(
            f,
            "tree: {:.0} MiB of random data in {} files ({} large), {} rounds per tool and direction; MiB/s, whole command timed",
            self.tree_bytes as f64 / 1048576.0,
            self.files,
            self.options.large_files,
            self.options.rounds
        )?;
        writeln!(
            f,
            "\n  {:<34} {:>8} {:>8} {:>8}",
            "", "min", "median", "max"
        )?;
        for (name, s) in [
            ("berth sync -> volume", &self.berth_to),
            ("docker cp -> volume", &self.docker_cp_to),
            ("berth sync --from volume ->", &self.berth_from),
            ("docker cp volume ->", &self.docker_cp_from),
        ] {
            writeln!(
                f,
                "  {name:<34} {:>8.1} {:>8.1} {:>8.1}",
                s.min, s.median, s.max
            )?;
        }
        writeln!(f, "\nratios (medians, berth / docker cp)")?;
        writeln!(f, "  to the volume:   {:.2}x", self.ratio_to())?;
        writeln!(f, "  from the volume: {:.2}x", self.ratio_from())
    }
}
