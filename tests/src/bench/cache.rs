//! The tenant's build cache: a build on a brand-new host with the cache a
//! previous lease of the tenant pushed, against the same build on a
//! brand-new host without it (what every build pays without the cache),
//! in the same run and on the same pool.
//!
//! The project is a multi-stage Dockerfile `FROM scratch` (the static
//! busybox): a builder stage with a costly, deterministic CPU step (a shell
//! loop whose result is written to a file), and a final stage that copies
//! the result. (The final stage copies only the result: with a final
//! stage that also copied the busybox, as the builder stage does, dockerd
//! 20.10 exited during the first build with the inline cache.) Each round uses a tag of its own in the tenant's namespace,
//! so its first build finds no cache:
//!
//! 1. a lease on a fresh host builds it with `--cache-from` the round's
//!    tag (nothing there yet: the build without a cache) and pushes it
//!    (BuildKit's inline cache, `BUILDKIT_INLINE_CACHE=1`);
//! 2. the lease is released, and a lease on another fresh host builds it
//!    again with `--cache-from` the same tag (the build with the cache).
//!
//! Timed: the whole `docker build` command, as a CI step pays it (BuildKit
//! through Debian's 20.10 CLI, over the lease's mutual TLS). The push is
//! timed too, as what the first build of a tenant pays once.

use std::fmt;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use super::Summary;
use berth_testkit::{DEBIAN_DOCKER_CLI, LeaseEnv, Pool, busybox_context, run as run_cmd, stderr};

/// What to measure.
#[derive(Debug, Clone)]
pub struct Options {
    /// Iterations of the costly step's shell loop.
    pub loop_iterations: u64,
    /// Rounds (each: two fresh hosts).
    pub rounds: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            loop_iterations: 3_000_000,
            rounds: 3,
        }
    }
}

impl Options {
    pub fn smoke() -> Self {
        Self {
            loop_iterations: 20_000,
            rounds: 1,
        }
    }
}

/// What [`run`] measured, seconds per round.
#[derive(Debug, Clone)]
pub struct Report {
    pub machine: String,
    pub options: Options,
    /// The build on a fresh host without a cache.
    pub cold: Summary,
    /// The push of the inline cache.
    pub push: Summary,
    /// The build on another fresh host with the cache.
    pub warm: Summary,
    /// Whether the costly step was CACHED in every warm build.
    pub all_cached: bool,
}

impl Report {
    /// How many times faster the build with the cache is (medians).
    pub fn speedup(&self) -> f64 {
        self.cold.median / self.warm.median
    }
}

fn io_err(what: String) -> std::io::Error {
    std::io::Error::other(what)
}

/// BuildKit on the lease with its cache login; the pool CA is added to
/// the client's roots for the token endpoint (README, "A build cache per
/// tenant").
fn docker(lease: &LeaseEnv) -> Command {
    let mut c = lease.docker_at(Path::new(DEBIAN_DOCKER_CLI));
    c.env("DOCKER_BUILDKIT", "1")
        .env("DOCKER_CONFIG", lease.get("DOCKER_CONFIG"))
        .env(
            "SSL_CERT_DIR",
            format!("/etc/ssl/certs:{}", lease.cert_dir().display()),
        )
        .env_remove("SSL_CERT_FILE");
    c
}

/// Writes the project.
pub fn project(dir: &Path, opts: &Options) {
    busybox_context(dir, "bench\n");
    let n = opts.loop_iterations;
    std::fs::write(
        dir.join("Dockerfile"),
        format!(
            "FROM scratch AS builder\n\
             COPY busybox /bin/busybox\n\
             RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n\
             RUN sh -c 'i=0; s=0; while [ $i -lt {n} ]; do i=$((i+1)); s=$(((s*31+i)%1000003)); done; echo berth-costly $s > /out.txt'\n\
             FROM scratch\n\
             COPY --from=builder /out.txt /out.txt\n\
             COPY index.html /www/index.html\n"
        ),
    )
    .unwrap_or_else(|e| panic!("writing the project: {e}"));
}

/// Builds `ctx` as `image` with the inline cache from `image`; returns the
/// seconds taken and BuildKit's plain output.
fn build(lease: &LeaseEnv, ctx: &Path, image: &str) -> std::io::Result<(f64, String)> {
    let started = Instant::now();
    let o = run_cmd(
        docker(lease)
            .args([
                "build",
                "--progress=plain",
                "--build-arg",
                "BUILDKIT_INLINE_CACHE=1",
                "--cache-from",
                image,
                "-t",
                image,
            ])
            .arg(ctx),
    );
    let secs = started.elapsed().as_secs_f64();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    if !o.status.success() {
        return Err(io_err(format!("docker build failed: {out}")));
    }
    Ok((secs, out))
}

/// Whether the costly step ran (its vertex is neither CACHED nor
/// skipped).
fn costly_ran(progress: &str) -> bool {
    let Some(id) = progress
        .lines()
        .find(|l| l.contains("berth-costly") && l.starts_with('#'))
        .and_then(|l| l.split_whitespace().next())
    else {
        // Not even listed: the whole builder stage was skipped.
        return false;
    };
    !progress.lines().any(|l| l.trim() == format!("{id} CACHED"))
}

/// Runs the benchmark on a two-host pool of its own (torn down after).
pub fn run(opts: &Options) -> std::io::Result<Report> {
    let pool = Pool::start("bmc-", 2, &[]);
    let scratch = pool.state_dir.join("bench-cache");
    let ctx = scratch.join("ctx");
    project(&ctx, opts);
    let (mut cold, mut push, mut warm) = (vec![], vec![], vec![]);
    let mut all_cached = true;
    for round in 0..opts.rounds {
        let first = pool.acquire(&format!("bench-cache-{round}-a"), "1h", "2m");
        let image = format!("{}/bench:r{round}", first.get("BERTH_CACHE_REPO"));
        let result = (|| {
            let (secs, out) = build(&first, &ctx, &image)?;
            if !costly_ran(&out) {
                return Err(io_err(format!(
                    "the build on a fresh host found a cache:\n{out}"
                )));
            }
            cold.push(secs);
            let started = Instant::now();
            let o = run_cmd(docker(&first).args(["push", &image]));
            if !o.status.success() {
                return Err(io_err(format!("docker push: {}", stderr(&o))));
            }
            push.push(started.elapsed().as_secs_f64());
            Ok(())
        })();
        let _ = pool.berth(&["release", "--lease", first.lease_id()]);
        result?;
        let second = pool.acquire(&format!("bench-cache-{round}-b"), "1h", "2m");
        let result = build(&second, &ctx, &image);
        let _ = pool.berth(&["release", "--lease", second.lease_id()]);
        let (secs, out) = result?;
        all_cached &= !costly_ran(&out);
        warm.push(secs);
    }
    let sum = |v: &[f64]| Summary::of(v).ok_or_else(|| io_err("no rounds".into()));
    Ok(Report {
        machine: super::machine(),
        options: opts.clone(),
        cold: sum(&cold)?,
        push: sum(&push)?,
        warm: sum(&warm)?,
        all_cached,
    })
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "build cache benchmark")?;
        writeln!(f, "machine: {}", self.machine)?;
        writeln!(
            f,
            "project: multi-stage, a costly step of {} shell-loop iterations; {} rounds, each on two fresh hosts; seconds, whole command timed",
            self.options.loop_iterations, self.options.rounds
        )?;
        super::write_table(
            f,
            &[
                ("build on a fresh host, no cache", &self.cold),
                ("push of the inline cache", &self.push),
                ("build on a fresh host, tenant's cache", &self.warm),
            ],
        )?;
        writeln!(
            f,
            "\ncostly step cached in every build with the cache: {}",
            self.all_cached
        )?;
        writeln!(
            f,
            "speedup (medians, no cache / cache): {}x",
            super::fmt(self.speedup())
        )
    }
}
