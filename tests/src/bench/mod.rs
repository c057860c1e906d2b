//! berth's benchmark suite: every figure measured against a baseline taken
//! in the same run, on the same machine, interleaved where it can be, so
//! that a noisy shared machine moves both and the ratio stays meaningful.
//!
//! | figure | what | baseline |
//! |---|---|---|
//! | P1 | Acquire latency with a Ready host (answered once the assignment is durable), and the same up to the first `/_ping` through the lease's front | a bare unary gRPC round trip (`grpc.health.v1.Health/Check`) to the same coordinator |
//! | P2 | coordinator with N agents heartbeating and CI clients doing acquire/release cycles at a fixed rate | the same load with fewer agents |
//! | P3 | agent start to `READY` (and to Ready at the coordinator) | dockerd alone, same flags, start to `/_ping` |
//! | P4 | the agent's wipe of a busy host | `docker rm -f $(docker ps -aq)` + `docker system prune -af --volumes` on the same host, populated the same way |
//! | P5 | release to the host Ready (and leased) again in `--recycle` mode | the P4 docker CLI sequence on the same host |
//! | idle | agent RSS and CPU while Ready and idle | none |
//! | TLS front | bulk and small-request throughput through the agent's mutual-TLS Docker front ([`tls_front`]) | dockerd's unix socket, and dockerd's own `--tlsverify` TCP listener |
//! | sync | `berth sync` of a tree into a volume and back ([`sync`]) | `docker cp` of the same tree |
//! | pg | P1 and P2 with the coordinator's store on PostgreSQL, and the failover time between two coordinators ([`pg`]; not in `all`) | the same on the embedded store, in the same run |
//! | cache | a build on a fresh host with the tenant's build cache ([`cache`]) | the same build on a fresh host without it |
//! | mirror | a pull on a fresh host from the warm registry mirror, the upstream behind a 100 Mbit/s link ([`mirror`]) | the pull of the same image on a fresh host straight from the upstream across that link (no mirror); also through the cold mirror |
//! | capacity | single-use churn, a burst on the elastic pool, decisions per second at 10,000 hosts ([`capacity`]) | P3's boot, a pre-sized pool, 100 hosts (same run) |
//!
//! Everything runs as real processes: `berth-coordinator`, `berth-agent`
//! with its dockerd in a network namespace, the stock docker CLI, with the
//! pool's real credentials (TLS to the coordinator with the pool CA, a
//! tenant token for CI calls, the join token and a CSR for agents). P2's
//! agents are simulated by [`loadgen`], which speaks the real
//! `AgentService` protocol over a few TLS HTTP/2 connections. Each scenario
//! owns a prefix of its own; guards stop and sweep everything it started,
//! also when it fails.
//!
//! [`Sizes::full`] is what `berth-bench all` runs; [`Sizes::smoke`] is the
//! same code with tiny sizes, which CI runs (`tests/bench_smoke.rs`) to keep
//! the suite working.
//!
//! Shared here: the statistics and figures, a description of the machine,
//! and (in [`http`]) a minimal HTTP/1.1 client for the Docker API over any
//! byte stream (unix socket, TCP, TLS).

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod boot;
pub mod cache;
pub mod capacity;
pub mod http;
pub mod latency;
pub mod loadgen;
pub mod mirror;
pub mod pg;
pub mod procs;
pub mod recycle;
pub mod scale;
pub mod sync;
pub mod tls_front;
pub mod wipe;

use std::fmt::Write as _;
use std::time::Duration;

/// What went wrong while setting up or running a benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{what}: {detail}")]
    Step { what: String, detail: String },
    #[error("gRPC {call}: {status}")]
    Grpc {
        call: &'static str,
        status: Box<tonic::Status>,
    },
    #[error("connecting to the coordinator: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout { what: String, timeout: Duration },
}

impl BenchError {
    pub fn step(what: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        BenchError::Step {
            what: what.into(),
            detail: detail.to_string(),
        }
    }

    pub fn grpc(call: &'static str) -> impl FnOnce(tonic::Status) -> Self {
        move |status| BenchError::Grpc {
            call,
            status: Box::new(status),
        }
    }

    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| BenchError::Io { what, source }
    }
}

pub type Result<T, E = BenchError> = std::result::Result<T, E>;

/// min / median / p99 / max of a set of samples (nearest-rank percentiles).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub median: f64,
    pub p99: f64,
    pub max: f64,
}

impl Summary {
    /// `None` for no samples; non-finite samples are a bug in the caller.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            let idx = (p * s.len() as f64).ceil() as usize;
            s[idx.clamp(1, s.len()) - 1]
        };
        Some(Summary {
            n: s.len(),
            min: s[0],
            median: rank(0.5),
            p99: rank(0.99),
            max: s[s.len() - 1],
        })
    }
}

/// One measured figure, with its baseline from the same run if it has one.
#[derive(Debug, Clone)]
pub struct Figure {
    /// Short key, e.g. `P1` or `P2 rss/agent @10000`.
    pub key: String,
    pub what: String,
    pub unit: &'static str,
    pub samples: Vec<f64>,
    pub baseline: Option<Baseline>,
    /// Targets and whether they were met.
    pub checks: Vec<Check>,
    /// Context that explains the figure (sizes, counts, errors seen).
    pub notes: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Baseline {
    pub what: String,
    pub samples: Vec<f64>,
}

/// A target from the issue, evaluated.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub target: String,
    pub met: bool,
}

impl Figure {
    pub fn new(key: impl Into<String>, what: impl Into<String>, unit: &'static str) -> Self {
        Figure {
            key: key.into(),
            what: what.into(),
            unit,
            samples: vec![],
            baseline: None,
            checks: vec![],
            notes: vec![],
        }
    }

    pub fn samples(mut self, samples: Vec<f64>) -> Self {
        self.samples = samples;
        self
    }

    pub fn baseline(mut self, what: impl Into<String>, samples: Vec<f64>) -> Self {
        self.baseline = Some(Baseline {
            what: what.into(),
            samples,
        });
        self
    }

    pub fn check(mut self, target: impl Into<String>, met: bool) -> Self {
        self.checks.push(Check {
            target: target.into(),
            met,
        });
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(note.into());
        self
    }

    pub fn summary(&self) -> Option<Summary> {
        Summary::of(&self.samples)
    }

    pub fn baseline_summary(&self) -> Option<Summary> {
        self.baseline.as_ref().and_then(|b| Summary::of(&b.samples))
    }

    /// Median over baseline median.
    pub fn ratio(&self) -> Option<f64> {
        let (v, b) = (self.summary()?, self.baseline_summary()?);
        (b.median > 0.0).then(|| v.median / b.median)
    }

    /// The figure as the lines `berth-bench` prints.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let line = |label: &str, s: Option<Summary>, unit: &str| match s {
            Some(s) => format!(
                "  {label:<44} n={:<5} min {:>10}  median {:>10}  p99 {:>10}  max {:>10} {unit}\n",
                s.n,
                fmt(s.min),
                fmt(s.median),
                fmt(s.p99),
                fmt(s.max)
            ),
            None => format!("  {label:<44} no samples\n"),
        };
        let _ = writeln!(out, "{} {}", self.key, self.what);
        out.push_str(&line("measured", self.summary(), self.unit));
        if let Some(b) = &self.baseline {
            out.push_str(&line(
                &format!("baseline: {}", b.what),
                Summary::of(&b.samples),
                self.unit,
            ));
            if let Some(r) = self.ratio() {
                let _ = writeln!(out, "  {:<44} {r:.2}x", "ratio (median / baseline median)");
            }
        }
        for c in &self.checks {
            let verdict = if c.met { "MET" } else { "NOT MET" };
            let _ = writeln!(out, "  target {:<37} {verdict}", c.target);
        }
        for n in &self.notes {
            let _ = writeln!(out, "  note: {n}");
        }
        out
    }
}

fn fmt(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// The scenarios `berth-bench` can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Everything below, in order.
    All,
    /// Acquire latency vs a bare unary gRPC round trip.
    P1,
    /// Coordinator scale: agents heartbeating plus acquire/release cycles.
    P2,
    /// Agent boot to Ready vs dockerd alone.
    P3,
    /// Wipe of a busy host vs the docker CLI's rm + prune.
    P4,
    /// Release to Ready again in recycle mode.
    P5,
    /// Agent idle footprint: RSS and CPU.
    Idle,
    /// The agent's mutual-TLS Docker front vs dockerd's unix socket and
    /// dockerd's own --tlsverify TCP listener.
    TlsFront,
    /// `berth sync` into a volume and back vs `docker cp`.
    Sync,
    /// P1 and P2 on the PostgreSQL store vs the embedded one, and the
    /// failover time (not part of `all`: needs Debian's postgresql).
    Pg,
    /// A build on a fresh host with the tenant's build cache vs without.
    Cache,
    /// A pull on a fresh host from the warm mirror vs straight from the
    /// upstream across a shaped link (and through the cold mirror).
    Mirror,
    /// The elastic pool: churn waits vs P3's boot, a burst vs a pre-sized
    /// pool, decisions per second at 10,000 hosts vs 100.
    Capacity,
}

impl Scenario {
    pub fn expand(self) -> Vec<Scenario> {
        use Scenario::*;
        match self {
            All => vec![
                P1, P2, P3, P4, P5, Idle, TlsFront, Sync, Cache, Mirror, Capacity,
            ],
            s => vec![s],
        }
    }
}

/// What a busy host holds before a wipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Population {
    pub containers: usize,
    pub images: usize,
    pub volumes: usize,
    pub networks: usize,
}

impl Population {
    /// The P4 host: 20 running containers, 10 images, 10 volumes,
    /// 5 networks (and build cache from one build).
    pub const STANDARD: Population = Population {
        containers: 20,
        images: 10,
        volumes: 10,
        networks: 5,
    };
}

/// How big each scenario is.
#[derive(Debug, Clone)]
pub struct Sizes {
    /// Prefix base for host ids, namespaces and directories (the test tag
    /// goes in front).
    pub prefix: &'static str,
    pub p1_cycles: usize,
    pub p1_agents: usize,
    /// P1's hosts keep their directories (data roots, state files) on
    /// tmpfs, so no host writes to the store's disk (logs aside), as when
    /// the hosts are other machines.
    pub p1_hosts_in_memory: bool,
    /// Agent counts for P2; the first is the baseline.
    pub p2_agents: Vec<usize>,
    /// Also run this many agents with one TCP (TLS) connection each.
    pub p2_conn_per_agent: Option<usize>,
    /// Also run the baseline count with the coordinator's store on tmpfs.
    pub p2_memory_store: bool,
    pub p2_agents_per_conn: usize,
    pub p2_rate: f64,
    pub p2_duration: Duration,
    pub p2_clients: usize,
    pub p2_heartbeat: Duration,
    pub p3_runs: usize,
    pub p4_runs: usize,
    pub p4_population: Population,
    /// Container counts for the growth series (with fewer runs each).
    pub p4_growth: Vec<usize>,
    pub p4_growth_runs: usize,
    pub p5_runs: usize,
    pub idle_window: Duration,
    pub tls_front: tls_front::Options,
    pub sync: sync::Options,
    /// Failover rounds of the `pg` scenario.
    pub failover_runs: usize,
    pub cache: cache::Options,
    pub mirror: mirror::Options,
    pub capacity: capacity::Options,
}

impl Sizes {
    /// The full run documented in BENCHMARKS.md.
    pub fn full() -> Self {
        Sizes {
            prefix: "bn-",
            p1_cycles: 300,
            p1_agents: 3,
            p1_hosts_in_memory: false,
            p2_agents: vec![100, 1, 10_000],
            p2_conn_per_agent: Some(10_000),
            p2_memory_store: true,
            p2_agents_per_conn: 250,
            p2_rate: 1000.0,
            p2_duration: Duration::from_secs(20),
            p2_clients: 64,
            p2_heartbeat: Duration::from_secs(2),
            p3_runs: 10,
            p4_runs: 5,
            p4_population: Population::STANDARD,
            p4_growth: vec![1, 100],
            p4_growth_runs: 2,
            p5_runs: 5,
            idle_window: Duration::from_secs(30),
            tls_front: tls_front::Options::default(),
            sync: sync::Options::default(),
            failover_runs: 5,
            cache: cache::Options::default(),
            mirror: mirror::Options::default(),
            capacity: capacity::Options::default(),
        }
    }

    /// The same code in seconds, for CI.
    pub fn smoke() -> Self {
        Sizes {
            prefix: "bns-",
            p1_cycles: 10,
            p1_agents: 1,
            p1_hosts_in_memory: false,
            p2_agents: vec![5, 50],
            p2_conn_per_agent: None,
            p2_memory_store: true,
            p2_agents_per_conn: 20,
            p2_rate: 50.0,
            p2_duration: Duration::from_secs(1),
            p2_clients: 4,
            p2_heartbeat: Duration::from_millis(500),
            p3_runs: 1,
            p4_runs: 1,
            p4_population: Population {
                containers: 2,
                images: 2,
                volumes: 1,
                networks: 1,
            },
            p4_growth: vec![],
            p4_growth_runs: 0,
            p5_runs: 1,
            idle_window: Duration::from_secs(2),
            tls_front: tls_front::Options::smoke(),
            sync: sync::Options {
                tree_mib: 2,
                files: 50,
                large_files: 2,
                rounds: 1,
            },
            failover_runs: 1,
            cache: cache::Options::smoke(),
            mirror: mirror::Options::smoke(),
            capacity: capacity::Options::smoke(),
        }
    }
}

/// Runs the scenarios in order, printing each figure as soon as it is
/// measured; returns them all. A scenario that fails stops the run with its
/// error (everything it started is torn down first).
pub async fn run(scenarios: &[Scenario], sizes: &Sizes) -> Result<Vec<Figure>> {
    let mut figures = vec![];
    for s in scenarios.iter().flat_map(|s| s.expand()) {
        eprintln!("berth-bench: running {s:?}");
        let started = std::time::Instant::now();
        let mut got = match s {
            Scenario::All => vec![],
            Scenario::P1 => latency::run(sizes).await?,
            Scenario::P2 => scale::run(sizes).await?,
            Scenario::P3 => boot::run(sizes).await?,
            Scenario::P4 => wipe::run(sizes).await?,
            Scenario::P5 => recycle::run(sizes).await?,
            Scenario::Idle => boot::idle(sizes).await?,
            Scenario::Pg => pg::run(sizes).await?,
            Scenario::Capacity => capacity::run(sizes).await?,
            Scenario::TlsFront => {
                let report = tls_front::run_in_thread(sizes.tls_front.clone()).await?;
                println!("{report}\n");
                tls_front::figures(&report)
            }
            Scenario::Sync => {
                let opts = sizes.sync.clone();
                let report = tokio::task::spawn_blocking(move || sync::run(&opts))
                    .await
                    .map_err(|_| {
                        BenchError::step(
                            "the sync benchmark",
                            "it panicked (see the message above)",
                        )
                    })?
                    .map_err(BenchError::io("the sync benchmark"))?;
                println!("{report}\n");
                vec![]
            }
            Scenario::Cache => {
                let opts = sizes.cache.clone();
                let report = tokio::task::spawn_blocking(move || cache::run(&opts))
                    .await
                    .map_err(|_| {
                        BenchError::step(
                            "the build cache benchmark",
                            "it panicked (see the message above)",
                        )
                    })?
                    .map_err(BenchError::io("the build cache benchmark"))?;
                println!("{report}\n");
                vec![]
            }
            Scenario::Mirror => {
                let opts = sizes.mirror.clone();
                let report = tokio::task::spawn_blocking(move || mirror::run(&opts))
                    .await
                    .map_err(|_| {
                        BenchError::step(
                            "the registry mirror benchmark",
                            "it panicked (see the message above)",
                        )
                    })?
                    .map_err(BenchError::io("the registry mirror benchmark"))?;
                println!("{report}\n");
                vec![]
            }
        };
        for f in &got {
            println!("{}", f.render());
        }
        eprintln!(
            "berth-bench: {s:?} done in {:.1}s",
            started.elapsed().as_secs_f64()
        );
        figures.append(&mut got);
    }
    Ok(figures)
}

/// The closing table: one line per figure with its median, the baseline's
/// and the ratio, and whether its targets were met.
pub fn summary_table(figures: &[Figure]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<34} {:>12} {:>12} {:>8}  targets",
        "figure", "median", "baseline", "ratio"
    );
    for f in figures {
        let m = f
            .summary()
            .map(|s| format!("{} {}", fmt(s.median), f.unit))
            .unwrap_or_else(|| "-".into());
        let b = f
            .baseline_summary()
            .map(|s| format!("{} {}", fmt(s.median), f.unit))
            .unwrap_or_else(|| "-".into());
        let r = f
            .ratio()
            .map(|r| format!("{r:.2}x"))
            .unwrap_or_else(|| "-".into());
        let t = if f.checks.is_empty() {
            String::new()
        } else {
            f.checks
                .iter()
                .map(|c| format!("{} {}", c.target, if c.met { "MET" } else { "NOT MET" }))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let _ = writeln!(out, "{:<34} {m:>12} {b:>12} {r:>8}  {t}", f.key);
    }
    out
}

/// A table of summaries (min, median, max; two decimals) under a header,
/// one row per name, as the reports of `cache` and `mirror` print them.
pub fn write_table(f: &mut std::fmt::Formatter<'_>, rows: &[(&str, &Summary)]) -> std::fmt::Result {
    writeln!(
        f,
        "\n  {:<44} {:>8} {:>8} {:>8}",
        "", "min", "median", "max"
    )?;
    for (name, s) in rows {
        writeln!(
            f,
            "  {name:<44} {:>8.2} {:>8.2} {:>8.2}",
            s.min, s.median, s.max
        )?;
    }
    Ok(())
}

/// Milliseconds of a duration, as a sample.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// CPU model, cores, memory and kernel of this machine.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{model}, {cores} cores, {:.1} GiB RAM, Linux {}",
        mem_kib as f64 / 1024.0 / 1024.0,
        kernel.trim()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_uses_nearest_rank() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        let sum = Summary::of(&s).unwrap();
        assert_eq!(
            (sum.n, sum.min, sum.median, sum.p99, sum.max),
            (100, 1.0, 50.0, 99.0, 100.0)
        );
        let one = Summary::of(&[7.0]).unwrap();
        assert_eq!(
            (one.min, one.median, one.p99, one.max),
            (7.0, 7.0, 7.0, 7.0)
        );
        assert!(Summary::of(&[]).is_none());
    }

    #[test]
    fn ratio_and_rendering() {
        let f = Figure::new("P9", "thing", "ms")
            .samples(vec![2.0, 4.0, 6.0])
            .baseline("other", vec![1.0, 2.0, 3.0])
            .check("median <= 5 ms", true);
        assert_eq!(f.ratio(), Some(2.0));
        let text = f.render();
        assert!(text.contains("P9 thing"), "{text}");
        assert!(text.contains("2.00x"), "{text}");
        assert!(text.contains("MET"), "{text}");
        assert!(summary_table(&[f]).contains("P9"));
    }
}
