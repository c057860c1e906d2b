//! Capacity: the elastic pool's three figures, each against a baseline
//! measured in the same run.
//!
//! | figure | what | baseline |
//! |---|---|---|
//! | churn | single-use churn on a `berth up --hosts K` pool: builds back to back, each holding its host about a second; how long each `berth acquire` waits | P3 "registered" (agent start to Ready at the coordinator), this run |
//! | burst | an elastic pool at its minimum (`--min-hosts 1 --max-hosts N --idle-hosts 0`): from a burst of N concurrent acquires until all N builds hold a Ready host | the same burst on a pool pre-sized to N Ready hosts |
//! | decide | capacity decisions per second (the inputs read under the pool's lock, the desired capacity, the scale-in timer: one `Pool::tick`) with 10,000 hosts registered | the same with 100 hosts |
//!
//! churn and burst run real `berth up` process trees (coordinator, agents,
//! dockerds in namespaces) and the `berth` CLI, as the end-to-end tests do;
//! decide runs the coordinator's pool in this process, the code its timer
//! runs.

use std::time::{Duration, Instant, SystemTime};

use berth_coordinator::capacity::CapacityConfig;
use berth_coordinator::clock::Now;
use berth_coordinator::pool::{Pool as CoordinatorPool, PoolConfig, Registration};
use berth_proto::v1 as pb;
use berth_testkit::{Pool, ok, run as run_cmd};

use super::{BenchError, Figure, Result, Sizes, boot, ms};

/// What to measure.
#[derive(Debug, Clone)]
pub struct Options {
    /// churn: hosts of the pool.
    pub churn_hosts: u16,
    /// churn: builds back to back.
    pub churn_builds: usize,
    /// churn: how long each build holds its host.
    pub churn_hold: Duration,
    /// burst: concurrent acquires (and the pool's max).
    pub burst: u16,
    /// burst: rounds per pool.
    pub burst_rounds: usize,
    /// decide: registered hosts, the first being the baseline.
    pub decide_hosts: [usize; 2],
    /// decide: how long each count is measured.
    pub decide_window: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            churn_hosts: 3,
            churn_builds: 30,
            churn_hold: Duration::from_secs(1),
            burst: 4,
            burst_rounds: 3,
            decide_hosts: [100, 10_000],
            decide_window: Duration::from_secs(2),
        }
    }
}

impl Options {
    pub fn smoke() -> Self {
        Self {
            churn_hosts: 1,
            churn_builds: 2,
            churn_hold: Duration::from_millis(100),
            burst: 2,
            burst_rounds: 1,
            decide_hosts: [10, 100],
            decide_window: Duration::from_millis(100),
        }
    }
}

/// Allowance over a host's boot for an acquire's own work (the CLI's start,
/// its key pair, the TLS handshakes, the agent's acceptance).
const CHURN_MARGIN_MS: f64 = 2000.0;
/// How long idle hosts stay above the target before the elastic pool lets
/// them go between burst rounds.
const SCALE_IN_AFTER: &str = "1s";
const SETTLE_TIMEOUT: Duration = Duration::from_secs(120);

pub async fn run(sizes: &Sizes) -> Result<Vec<Figure>> {
    let opts = sizes.capacity.clone();
    // The boot the churn is judged against: P3 in this run.
    let p3 = boot::run(sizes).await?;
    let boots = p3
        .iter()
        .find(|f| f.key == "P3 registered")
        .map(|f| f.samples.clone())
        .ok_or_else(|| BenchError::step("P3", "no 'P3 registered' figure"))?;
    let blocking = opts.clone();
    // Blocking: the pools are driven through the CLI, and the in-process
    // pool gets a runtime of its own.
    let (churn, burst, decide) = tokio::task::spawn_blocking(move || {
        let churn = churn(&blocking);
        let burst = burst(&blocking);
        (churn, burst, decide(&blocking))
    })
    .await
    .map_err(|_| {
        BenchError::step(
            "the capacity benchmark",
            "it panicked (see the message above)",
        )
    })?;
    let (waits, served) = churn;
    let boot_median = super::Summary::of(&boots).map_or(0.0, |s| s.median);
    let churn = Figure::new(
        "capacity churn",
        format!(
            "acquire wait, {} single-use hosts, {} builds back to back holding {:?} each",
            opts.churn_hosts, opts.churn_builds, opts.churn_hold
        ),
        "ms",
    )
    .samples(waits.clone())
    .baseline(
        "P3 registered: agent start to Ready at the coordinator",
        boots,
    );
    let worst = super::Summary::of(&waits).map_or(f64::MAX, |s| s.max);
    let churn = churn
        .check(
            format!("every wait <= a boot (median) + {CHURN_MARGIN_MS:.0} ms"),
            worst <= boot_median + CHURN_MARGIN_MS,
        )
        .note(format!("{served} distinct hosts served the builds"));

    let (elastic, presized) = burst;
    let burst = Figure::new(
        format!("capacity burst @{}", opts.burst),
        format!(
            "burst of {} acquires to all holding a Ready host, elastic pool at min 1",
            opts.burst
        ),
        "ms",
    )
    .samples(elastic)
    .baseline(
        format!("pool pre-sized to {} Ready hosts", opts.burst),
        presized,
    );

    Ok(vec![churn, burst, decide?])
}

/// Builds back to back on a small single-use pool: the acquire waits (ms)
/// and how many distinct hosts served them.
fn churn(opts: &Options) -> (Vec<f64>, usize) {
    let pool = Pool::start("bkch-", opts.churn_hosts, &[]);
    let mut waits = Vec::with_capacity(opts.churn_builds);
    for i in 0..opts.churn_builds {
        let asked = Instant::now();
        let lease = pool.acquire(&format!("churn-{i}"), "5m", "2m");
        waits.push(ms(asked.elapsed()));
        let held = Instant::now();
        ok(run_cmd(lease.docker().arg("version")), "docker version");
        std::thread::sleep(opts.churn_hold.saturating_sub(held.elapsed()));
        ok(
            pool.berth(&["release", "--lease", lease.lease_id()]),
            "release",
        );
    }
    let mut hosts: Vec<String> = pool
        .all_leases()
        .into_iter()
        .filter(|l| l.build_id.starts_with("churn-"))
        .map(|l| l.host_id)
        .collect();
    hosts.sort_unstable();
    hosts.dedup();
    (waits, hosts.len())
}

/// Bursts of concurrent acquires on an elastic pool at its minimum and on a
/// pool pre-sized to the burst: ms from the burst until every build holds
/// its host, per round, (elastic, pre-sized).
fn burst(opts: &Options) -> (Vec<f64>, Vec<f64>) {
    let n = opts.burst;
    let max = n.to_string();
    let elastic = Pool::start(
        "bkel-",
        1,
        &[
            "--min-hosts",
            "1",
            "--max-hosts",
            &max,
            "--idle-hosts",
            "0",
            "--scale-in-after",
            SCALE_IN_AFTER,
        ],
    );
    let mut e = vec![];
    for round in 0..opts.burst_rounds {
        // Back at the minimum: one Ready host, nothing else running.
        settle(&elastic, 1, |p| {
            let s = p.pool_stats();
            s.desired_hosts == 1 && p.agent_pids().len() == 1
        });
        e.push(one_burst(&elastic, n, &format!("el{round}")));
    }
    drop(elastic);
    let presized = Pool::start("bkps-", n, &[]);
    let mut p = vec![];
    for round in 0..opts.burst_rounds {
        settle(&presized, usize::from(n), |_| true);
        p.push(one_burst(&presized, n, &format!("ps{round}")));
    }
    (e, p)
}

/// Waits until `pool` has `ready` Ready hosts and `also` holds.
fn settle(pool: &Pool, ready: usize, also: impl Fn(&Pool) -> bool) {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    while !(pool.ready_hosts().len() == ready && also(pool)) {
        assert!(
            Instant::now() < deadline,
            "the pool did not settle at {ready} Ready hosts within {SETTLE_TIMEOUT:?}: {:?}",
            pool.pool_stats()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// N concurrent `berth acquire`s; ms until the last holds its host. Every
/// lease is released afterwards.
fn one_burst(pool: &Pool, n: u16, tag: &str) -> f64 {
    let started = Instant::now();
    let leases: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| s.spawn(move || pool.acquire(&format!("burst-{tag}-{i}"), "5m", "3m")))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("an acquire of the burst failed"))
            .collect()
    });
    let took = ms(started.elapsed());
    for lease in &leases {
        ok(run_cmd(lease.docker().arg("version")), "docker version");
        ok(
            pool.berth(&["release", "--lease", lease.lease_id()]),
            "release",
        );
    }
    took
}

/// Decisions per second with each host count, sampled in windows of a
/// tenth of the measuring time.
fn decide(opts: &Options) -> Result<Figure> {
    let rate = |hosts: usize| -> Result<Vec<f64>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(BenchError::io("a runtime for the pool"))?;
        let _guard = rt.enter();
        let pool = CoordinatorPool::new(PoolConfig {
            capacity: Some(CapacityConfig {
                min: 1,
                max: u32::try_from(hosts * 2).unwrap_or(u32::MAX),
                idle_target: 1,
                scale_in_after: Duration::from_secs(3600),
            }),
            ..PoolConfig::default()
        });
        let now = Now {
            mono: tokio::time::Instant::now(),
            wall: SystemTime::now(),
        };
        // The agents' streams stay open: a closed one is a disconnect.
        let mut streams = Vec::with_capacity(hosts);
        for i in 0..hosts {
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            pool.register(registration(i), Default::default(), tx, now)
                .map_err(|e| BenchError::step("registering a host", e))?;
            streams.push(rx);
        }
        let desired = pool.desired_hosts(now);
        // Nothing leased or queued: the idle target.
        if desired != Some(1) {
            return Err(BenchError::step(
                "the decision",
                format!("{hosts} idle hosts, idle target 1, min 1: desired {desired:?}, not 1"),
            ));
        }
        let window = opts.decide_window / 10;
        let mut samples = vec![];
        for _ in 0..10 {
            let started = Instant::now();
            let mut n = 0u64;
            while started.elapsed() < window {
                pool.tick(now);
                n += 1;
            }
            samples.push(n as f64 / started.elapsed().as_secs_f64());
        }
        drop(streams);
        Ok(samples)
    };
    let [base, big] = opts.decide_hosts;
    let baseline = rate(base)?;
    let measured = rate(big)?;
    let per_second = super::Summary::of(&measured).map_or(0.0, |s| s.median);
    Ok(Figure::new(
        format!("capacity decide @{big}"),
        format!("capacity decisions (one pool tick) per second, {big} Ready hosts"),
        "/s",
    )
    .samples(measured)
    .baseline(format!("{base} Ready hosts"), baseline)
    .check(
        "a decision every 100 ms costs < 10% of a core",
        per_second >= 100.0,
    ))
}

/// An idle, Ready host as its agent registers it.
fn registration(i: usize) -> Registration {
    Registration {
        host_id: format!("bench-{i}"),
        host_addr: "198.18.0.2".into(),
        docker_host: "tcp://198.18.0.2:2376".into(),
        provider: "bench".into(),
        resources: None,
        agent_version: "bench".into(),
        docker_version: "bench".into(),
        state: pb::HostState::Ready,
        lease_id: String::new(),
        lease_deadline: None,
        key: None,
        lease_key: None,
    }
}
