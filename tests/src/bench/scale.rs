//! P2: the coordinator under N connected agents heartbeating (at the
//! production interval unless the sizes say otherwise) while CI clients run
//! acquire/release cycles at a fixed rate. For each N: cycles per second
//! (per one-second bucket), acquire latency under load, coordinator CPU and
//! RSS per connected agent. The first agent count in the sizes is the
//! baseline the others are compared with.
//!
//! The coordinator is the real binary in its own process, so its RSS and
//! CPU come from /proc; the simulated agents and CI clients run in this
//! process on the same two cores, which the figures share.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::loadgen::LoadGen;
use super::procs::{Clients, Coordinator, Env, cpu_time, rss_kib};
use super::{Figure, Result, Sizes, ms};

/// HTTP/2 connections the CI clients share.
const CI_CONNECTIONS: usize = 4;
/// How long an acquire may queue when every host is busy.
const ACQUIRE_WAIT: Duration = Duration::from_secs(5);
/// Heartbeat rounds to let pass after registration before measuring.
const SETTLE_ROUNDS: u32 = 2;
/// RSS target per connected agent.
const RSS_TARGET_KIB: f64 = 20.0;

/// What one run at one agent count measured.
#[derive(Debug, Clone)]
pub struct Run {
    pub agents: usize,
    pub connections: usize,
    pub per_second: Vec<f64>,
    pub acquire_ms: Vec<f64>,
    pub release_ms: Vec<f64>,
    pub cycles: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub rss_idle_kib: f64,
    pub rss_connected_kib: f64,
    pub rss_after_kib: f64,
    /// CPU of the coordinator in % of one core.
    pub cpu_heartbeats_pct: f64,
    pub cpu_load_pct: f64,
    /// CPU of this process (simulated agents + CI clients) during the load.
    pub cpu_generator_pct: f64,
    pub heartbeats: u64,
}

impl Run {
    pub fn rss_per_agent_kib(&self) -> f64 {
        (self.rss_connected_kib - self.rss_idle_kib) / self.agents.max(1) as f64
    }
    pub fn rss_per_agent_after_kib(&self) -> f64 {
        (self.rss_after_kib - self.rss_idle_kib) / self.agents.max(1) as f64
    }
}

fn cpu_pct(pid: i32, window: Duration, before: Duration) -> f64 {
    let used = cpu_time(pid).unwrap_or_default().saturating_sub(before);
    100.0 * used.as_secs_f64() / window.as_secs_f64()
}

/// Where the coordinator's lease store lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// Its state directory on the machine's disk, as deployed: every batch
    /// of changes (group commit) waits for fsync.
    Disk,
    /// On tmpfs, where fsync returns at once: the same code without the
    /// disk's flush latency, to show what durability costs.
    Memory,
    /// In a PostgreSQL cluster of the run's own (`--store postgres://`,
    /// data on the same disk, every commit waits for its WAL flush).
    Postgres,
}

/// One coordinator, `agents` simulated agents, the CI load; all torn down.
pub async fn measure(
    sizes: &Sizes,
    agents: usize,
    per_conn: usize,
    tag: &str,
    store: Store,
) -> Result<Run> {
    let env = Env::new(&format!("{}2{tag}-", sizes.prefix.trim_end_matches('-')))?;
    let hb = humantime_ms(sizes.p2_heartbeat);
    let state_dir = match store {
        Store::Disk | Store::Postgres => env.state_dir.join("coordinator"),
        Store::Memory => env.memory_dir().join("coordinator"),
    };
    // The simulated agents recycle their hosts after every lease.
    let mut extra = vec!["--heartbeat-interval".into(), hb, "--recycle".into()];
    // Declared before the coordinator: stopped after it.
    let _pg = match store {
        Store::Postgres => {
            let (pg, args) = super::pg::cluster(&env)?;
            extra.extend(args);
            Some(pg)
        }
        Store::Disk | Store::Memory => None,
    };
    let coordinator = Coordinator::start_at(&env, "coordinator", &state_dir, &extra)?;
    let pid = coordinator.pid;
    // Let the fresh process settle before the idle reading.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_idle_kib = rss_kib(pid).unwrap_or(0.0);

    let lg = LoadGen::start(&coordinator, &env.prefix, &env.join_token, agents, per_conn).await?;
    let connections = lg.connections;
    tokio::time::sleep(sizes.p2_heartbeat * SETTLE_ROUNDS).await;
    // Heartbeats only, no leases: the cost of keeping N agents connected.
    let hb_window = sizes.p2_heartbeat * 2;
    let cpu0 = cpu_time(pid).unwrap_or_default();
    tokio::time::sleep(hb_window).await;
    let cpu_heartbeats_pct = cpu_pct(pid, hb_window, cpu0);
    let rss_connected_kib = rss_kib(pid).unwrap_or(0.0);

    let mut chans = vec![];
    for _ in 0..CI_CONNECTIONS {
        chans.push(coordinator.channel().await?);
    }
    let hb0 = lg.counters.heartbeats.load(Ordering::Relaxed);
    let cpu0 = cpu_time(pid).unwrap_or_default();
    let me = i32::try_from(std::process::id()).unwrap_or(0);
    let gen0 = cpu_time(me).unwrap_or_default();
    let load = ci_load(&chans, &coordinator.token, sizes, tag).await;
    let cpu_load_pct = cpu_pct(pid, load.elapsed, cpu0);
    let cpu_generator_pct = cpu_pct(me, load.elapsed, gen0);
    let heartbeats = lg.counters.heartbeats.load(Ordering::Relaxed) - hb0;
    let rss_after_kib = rss_kib(pid).unwrap_or(0.0);
    let failed = lg.counters.failed.load(Ordering::Relaxed);
    lg.stop().await;
    drop(coordinator);
    drop(env);
    let mut first_error = load.first_error;
    if failed > 0 {
        first_error.get_or_insert_with(|| format!("{failed} agent streams failed"));
    }
    Ok(Run {
        agents,
        connections,
        per_second: load.per_second,
        acquire_ms: load.acquire_ms,
        release_ms: load.release_ms,
        cycles: load.cycles,
        errors: load.errors + failed as u64,
        first_error,
        rss_idle_kib,
        rss_connected_kib,
        rss_after_kib,
        cpu_heartbeats_pct,
        cpu_load_pct,
        cpu_generator_pct,
        heartbeats,
    })
}

fn humantime_ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

struct Load {
    per_second: Vec<f64>,
    acquire_ms: Vec<f64>,
    release_ms: Vec<f64>,
    cycles: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
}

/// `p2_clients` tasks share a schedule of `p2_rate` cycle starts per second
/// for `p2_duration`; a late task starts its cycle at once (the schedule is
/// open-loop, so a slow coordinator shows up as a lower rate and longer
/// latencies, not as a quietly lighter load).
async fn ci_load(
    chans: &[tonic::transport::Channel],
    token: &str,
    sizes: &Sizes,
    tag: &str,
) -> Load {
    let slot = Arc::new(AtomicU64::new(0));
    let start = tokio::time::Instant::now();
    let total = (sizes.p2_rate * sizes.p2_duration.as_secs_f64()).round() as u64;
    let rate = sizes.p2_rate;
    let mut tasks = JoinSet::new();
    for c in 0..sizes.p2_clients {
        let mut clients = Clients::new(chans[c % chans.len()].clone(), token);
        let slot = slot.clone();
        let tag = tag.to_owned();
        tasks.spawn(async move {
            let mut acq = vec![];
            let mut rel = vec![];
            let mut done = vec![];
            let mut errors = 0u64;
            let mut first_error = None;
            loop {
                let k = slot.fetch_add(1, Ordering::Relaxed);
                if k >= total {
                    break;
                }
                tokio::time::sleep_until(start + Duration::from_secs_f64(k as f64 / rate)).await;
                let t = Instant::now();
                let lease = match clients.acquire(&format!("p2{tag}-{k}"), ACQUIRE_WAIT).await {
                    Ok(l) => l,
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e.to_string());
                        continue;
                    }
                };
                acq.push(ms(t.elapsed()));
                let t = Instant::now();
                match clients.release(&lease.lease_id).await {
                    Ok(_) => {
                        rel.push(ms(t.elapsed()));
                        done.push(Instant::now());
                    }
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e.to_string());
                    }
                }
            }
            (acq, rel, done, errors, first_error)
        });
    }
    let mut load = Load {
        per_second: vec![],
        acquire_ms: vec![],
        release_ms: vec![],
        cycles: 0,
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
    };
    let mut done_all = vec![];
    while let Some(r) = tasks.join_next().await {
        let Ok((a, r, d, e, fe)) = r else {
            load.errors += 1;
            continue;
        };
        load.acquire_ms.extend(a);
        load.release_ms.extend(r);
        done_all.extend(d);
        load.errors += e;
        if load.first_error.is_none() {
            load.first_error = fe;
        }
    }
    load.elapsed = start.elapsed();
    load.cycles = done_all.len() as u64;
    // Completions per whole second of the schedule.
    let std_start = start.into_std();
    let secs = sizes.p2_duration.as_secs().max(1) as usize;
    let mut buckets = vec![0u64; secs];
    for t in done_all {
        let i = t.saturating_duration_since(std_start).as_secs() as usize;
        if i < secs {
            buckets[i] += 1;
        }
    }
    load.per_second = buckets.into_iter().map(|b| b as f64).collect();
    load
}

pub async fn run(sizes: &Sizes) -> Result<Vec<Figure>> {
    // Each simulated agent holds a stream; one TCP connection per agent
    // needs that many descriptors here and in the coordinator (a child
    // inherits the limit).
    raise_nofile(65_536);
    let mut runs = vec![];
    for &n in &sizes.p2_agents {
        eprintln!(
            "berth-bench: P2 with {n} agents, {} per HTTP/2 connection",
            sizes.p2_agents_per_conn
        );
        runs.push(
            measure(
                sizes,
                n,
                sizes.p2_agents_per_conn,
                &n.to_string(),
                Store::Disk,
            )
            .await?,
        );
    }
    let mut figures = vec![];
    let base = runs[0].clone();
    for r in &runs {
        figures.extend(figures_for(sizes, r, &base));
    }
    if sizes.p2_memory_store {
        let n = base.agents;
        eprintln!("berth-bench: P2 with {n} agents, the coordinator's store on tmpfs");
        let m = measure(sizes, n, sizes.p2_agents_per_conn, "m", Store::Memory).await?;
        figures.extend(memory_figures(sizes, &m, &base));
    }
    if let Some(n) = sizes.p2_conn_per_agent {
        eprintln!("berth-bench: P2 with {n} agents, one TCP (TLS) connection each");
        let r = measure(sizes, n, 1, "c", Store::Disk).await?;
        let per = r.rss_per_agent_kib();
        // The multiplexed run with the same count, else the largest one.
        let mux = runs
            .iter()
            .find(|x| x.agents == n)
            .or_else(|| runs.iter().max_by_key(|x| x.agents))
            .unwrap_or(&base);
        figures.push(
            Figure::new(
                format!("P2 rss/agent @{n} 1conn"),
                format!("coordinator RSS per agent, {n} agents with one TCP connection each (as in production)"),
                "KiB",
            )
            .samples(vec![per])
            .baseline(
                format!("{} agents, {} per HTTP/2 connection", mux.agents, sizes.p2_agents_per_conn),
                vec![mux.rss_per_agent_kib()],
            )
            .check(format!("<= {RSS_TARGET_KIB} KiB per agent"), per <= RSS_TARGET_KIB)
            .note(format!(
                "idle {:.0} KiB, connected {:.0} KiB, after load {:.0} KiB; {} cycles at {:.0}/s median, {} errors{}",
                r.rss_idle_kib,
                r.rss_connected_kib,
                r.rss_after_kib,
                r.cycles,
                super::Summary::of(&r.per_second).map(|s| s.median).unwrap_or(0.0),
                r.errors,
                r.first_error.as_deref().map(|e| format!(" (first: {e})")).unwrap_or_default()
            )),
        );
    }
    Ok(figures)
}

/// The same load with the store on tmpfs, against the disk run: how much
/// of P2 is the lease store's fsync.
fn memory_figures(sizes: &Sizes, m: &Run, disk: &Run) -> Vec<Figure> {
    let n = m.agents;
    let base = "same load, store on disk (fsync per group commit)";
    let rate = Figure::new(
        format!("P2 cycles/s @{n} tmpfs store"),
        format!(
            "acquire+release cycles per second, target rate {:.0}/s, {n} agents, the coordinator's lease store on tmpfs",
            sizes.p2_rate
        ),
        "/s",
    )
    .samples(m.per_second.clone())
    .baseline(base, disk.per_second.clone())
    .note(format!(
        "{} cycles, {} errors{}; coordinator CPU {:.0}% of a core (disk run {:.0}%)",
        m.cycles,
        m.errors,
        m.first_error
            .as_deref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default(),
        m.cpu_load_pct,
        disk.cpu_load_pct
    ));
    let acq = Figure::new(
        format!("P2 acquire @{n} tmpfs store"),
        format!("Acquire latency under load, {n} agents, lease store on tmpfs"),
        "ms",
    )
    .samples(m.acquire_ms.clone())
    .baseline(base, disk.acquire_ms.clone());
    vec![rate, acq]
}

fn figures_for(sizes: &Sizes, r: &Run, base: &Run) -> Vec<Figure> {
    let n = r.agents;
    let is_base = r.agents == base.agents;
    let target_rate = sizes.p2_rate;
    let note = format!(
        "{n} agents over {} HTTP/2 connections, heartbeat {:?}, {} CI clients, {} cycles in {:?}, {} errors{}; {} heartbeats during the load; load generator (this process) used {:.0}% of a core, coordinator {:.0}%",
        r.connections,
        sizes.p2_heartbeat,
        sizes.p2_clients,
        r.cycles,
        sizes.p2_duration,
        r.errors,
        r.first_error
            .as_deref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default(),
        r.heartbeats,
        r.cpu_generator_pct,
        r.cpu_load_pct,
    );
    let with_base = |f: Figure, samples: Vec<f64>| {
        if is_base {
            f
        } else {
            f.baseline(format!("same load, {} agents", base.agents), samples)
        }
    };
    let rate = with_base(
        Figure::new(
            format!("P2 cycles/s @{n}"),
            format!("acquire+release cycles completed per second, target rate {target_rate:.0}/s, {n} agents"),
            "/s",
        )
        .samples(r.per_second.clone()),
        base.per_second.clone(),
    )
    .note(note);
    let s = rate.summary();
    let rate = if n >= 10_000 || (n > 1 && !is_base) {
        rate.check(
            format!("sustains {target_rate:.0} cycles/s (every second >= 95%), no errors"),
            s.is_some_and(|s| s.min >= 0.95 * target_rate) && r.errors == 0,
        )
    } else {
        rate
    };
    let acq = with_base(
        Figure::new(
            format!("P2 acquire @{n}"),
            format!("Acquire latency under load, {n} agents"),
            "ms",
        )
        .samples(r.acquire_ms.clone()),
        base.acquire_ms.clone(),
    );
    let rel = with_base(
        Figure::new(
            format!("P2 release @{n}"),
            format!("Release latency under load, {n} agents"),
            "ms",
        )
        .samples(r.release_ms.clone()),
        base.release_ms.clone(),
    );
    let per = r.rss_per_agent_kib();
    let rss = with_base(
        Figure::new(
            format!("P2 rss/agent @{n}"),
            format!("coordinator RSS per connected agent ((connected - idle) / {n})"),
            "KiB",
        )
        .samples(vec![per, r.rss_per_agent_after_kib()]),
        vec![base.rss_per_agent_kib(), base.rss_per_agent_after_kib()],
    )
    .note(format!(
        "samples: after connecting, after the load; RSS idle {:.0} KiB, connected {:.0} KiB, after load {:.0} KiB",
        r.rss_idle_kib, r.rss_connected_kib, r.rss_after_kib
    ));
    let rss = if n >= 1000 {
        rss.check(
            format!("<= {RSS_TARGET_KIB} KiB per agent"),
            per <= RSS_TARGET_KIB,
        )
    } else {
        rss
    };
    let cpu = with_base(
        Figure::new(
            format!("P2 cpu @{n}"),
            format!("coordinator CPU, % of one core: heartbeats only, then heartbeats + {target_rate:.0} cycles/s"),
            "%",
        )
        .samples(vec![r.cpu_heartbeats_pct, r.cpu_load_pct]),
        vec![base.cpu_heartbeats_pct, base.cpu_load_pct],
    );
    vec![rate, acq, rel, rss, cpu]
}

fn raise_nofile(want: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < want
    {
        let new = want.min(hard.max(want));
        if setrlimit(Resource::RLIMIT_NOFILE, new, hard.max(new)).is_err() {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}
