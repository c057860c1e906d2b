//! The shared store (`--store postgres://`) next to the embedded one
//! (redb), in the same run:
//!
//! - **P1 pg**: Acquire latency with a Ready host (answered once the
//!   assignment is durable), on a coordinator whose store is PostgreSQL; baseline: the
//!   same on a coordinator with the embedded store. Both pools run side by
//!   side (their own real agents in `--recycle` mode) and the cycles
//!   alternate between them, so both see the machine at the same moments.
//! - **P2 pg**: P2's load at its baseline agent count ([`super::scale`]),
//!   once on the embedded store and then on PostgreSQL: cycles per second
//!   and Acquire latency under load.
//! - **failover**: two coordinators on one database and a real agent given
//!   both addresses; the leader is killed (`kill -9`) and the time to the
//!   first Acquire served by the new leader (found by the CLI's leader
//!   search over both addresses) is measured, each round killing the
//!   current leader and starting the killed one again as the standby. No
//!   baseline: the time is the leader claim's expiry (`--leader-ttl`), the
//!   standby's poll and the agent's reconnect, reported with the TTL.
//!
//! The PostgreSQL cluster is the run's own (`berth_testkit::postgres`:
//! Debian's `postgresql` 15, data on the same disk as the embedded store,
//! default durability: a commit waits for its WAL flush).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use berth_testkit::postgres::Postgres;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::procs::{Agent, Clients, Coordinator, Env};
use super::scale::{self, Store};
use super::{BenchError, Figure, Result, Sizes, ms};

const READY_POLL: Duration = Duration::from_millis(2);
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Cycles per pool run first and thrown away.
const WARMUP: usize = 5;
/// The coordinators' `--leader-ttl` in the failover rounds.
pub const FAILOVER_TTL: &str = "4s";
/// Bound on one failover round's first acquire.
const FAILOVER_WAIT: Duration = Duration::from_secs(60);

/// A fresh PostgreSQL cluster with database `berth`, and the coordinator
/// flags that put a pool of `env` on it (the store key file written under
/// the env's state dir).
pub fn cluster(env: &Env) -> Result<(Postgres, Vec<String>)> {
    let pg = Postgres::start();
    let url = pg.create_db("berth");
    let key = env.state_dir.join("store.key");
    std::fs::write(&key, "3c".repeat(32))
        .map_err(BenchError::io(format!("writing {}", key.display())))?;
    let args = vec![
        format!("--store={url}"),
        format!("--store-key-file={}", key.display()),
    ];
    Ok((pg, args))
}

/// One pool for P1: a coordinator and its recycling agents, all Ready.
struct P1Pool {
    clients: Clients,
    _agents: Vec<Agent>,
    _coordinator: Coordinator,
}

async fn p1_pool(env: &Env, agents: usize, extra: &[String]) -> Result<P1Pool> {
    let mut extra = extra.to_vec();
    extra.push("--recycle".into());
    let coordinator = Coordinator::start(env, "coordinator", &extra)?;
    let mut started = vec![];
    for i in 0..agents {
        started.push(Agent::spawn(
            env,
            &coordinator,
            true,
            &format!("agent-{i}"),
        )?);
    }
    for a in &mut started {
        a.wait_ready().await?;
    }
    let mut clients = coordinator.clients().await?;
    clients
        .wait_ready_hosts(agents, Duration::from_millis(20), READY_TIMEOUT)
        .await?;
    Ok(P1Pool {
        clients,
        _agents: started,
        _coordinator: coordinator,
    })
}

/// One acquire (timed) and release on `pool`.
async fn cycle(pool: &mut P1Pool, build: &str) -> Result<f64> {
    pool.clients
        .wait_ready_hosts(1, READY_POLL, READY_TIMEOUT)
        .await?;
    let t = Instant::now();
    let lease = pool.clients.acquire(build, Duration::from_secs(10)).await?;
    let took = ms(t.elapsed());
    if !berth_testkit::holds_host(lease.state) {
        return Err(BenchError::step(
            "acquire",
            format!("lease does not hold its host: {lease:?}"),
        ));
    }
    pool.clients.release(&lease.lease_id).await?;
    Ok(took)
}

async fn p1(sizes: &Sizes) -> Result<Figure> {
    let base = sizes.prefix.trim_end_matches('-');
    let env_r = Env::new(&format!("{base}7r-"))?;
    let env_p = Env::new(&format!("{base}7p-"))?;
    let (pg, pg_args) = cluster(&env_p)?;
    let mut redb = p1_pool(&env_r, sizes.p1_agents, &[]).await?;
    let mut shared = p1_pool(&env_p, sizes.p1_agents, &pg_args).await?;
    let (mut on_pg, mut on_redb) = (vec![], vec![]);
    for i in 0..WARMUP + sizes.p1_cycles {
        // Alternate which goes first, so neither always follows the other.
        let (a, b) = if i % 2 == 0 {
            let b = cycle(&mut redb, &format!("p1r-{i}")).await?;
            (cycle(&mut shared, &format!("p1p-{i}")).await?, b)
        } else {
            let a = cycle(&mut shared, &format!("p1p-{i}")).await?;
            (a, cycle(&mut redb, &format!("p1r-{i}")).await?)
        };
        if i >= WARMUP {
            on_pg.push(a);
            on_redb.push(b);
        }
    }
    drop(shared);
    drop(redb);
    drop(pg);
    drop(env_p);
    drop(env_r);
    Ok(Figure::new(
        "P1 pg",
        "Acquire latency, Ready host waiting, coordinator store on PostgreSQL (loopback)",
        "ms",
    )
    .samples(on_pg)
    .baseline("the same on the embedded store (redb), interleaved", on_redb)
    .note(format!(
        "two pools side by side, {} agents each with real dockerds in --recycle mode; cycles alternate between them; {WARMUP} warm-up cycles dropped",
        sizes.p1_agents
    )))
}

fn p2_figures(sizes: &Sizes, pg: &scale::Run, disk: &scale::Run) -> Vec<Figure> {
    let n = pg.agents;
    let base = "same load, embedded store (redb, fsync per group commit)";
    let rate = Figure::new(
        format!("P2 cycles/s @{n} pg store"),
        format!(
            "acquire+release cycles per second, target rate {:.0}/s, {n} agents, coordinator store on PostgreSQL",
            sizes.p2_rate
        ),
        "/s",
    )
    .samples(pg.per_second.clone())
    .baseline(base, disk.per_second.clone())
    .note(format!(
        "{} cycles, {} errors{}; coordinator CPU {:.0}% of a core (embedded store run {:.0}%); runs one after the other",
        pg.cycles,
        pg.errors,
        pg.first_error
            .as_deref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default(),
        pg.cpu_load_pct,
        disk.cpu_load_pct
    ));
    let acq = Figure::new(
        format!("P2 acquire @{n} pg store"),
        format!("Acquire latency under load, {n} agents, coordinator store on PostgreSQL"),
        "ms",
    )
    .samples(pg.acquire_ms.clone())
    .baseline(base, disk.acquire_ms.clone());
    vec![rate, acq]
}

fn free_addr() -> Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(BenchError::io("a free port"))?;
    l.local_addr().map_err(BenchError::io("a free port"))
}

async fn failover(sizes: &Sizes) -> Result<Figure> {
    let base = sizes.prefix.trim_end_matches('-');
    let env = Env::new(&format!("{base}7f-"))?;
    let (pg, mut args) = cluster(&env)?;
    args.extend(["--recycle".into(), format!("--leader-ttl={FAILOVER_TTL}")]);
    let addrs = [free_addr()?, free_addr()?];
    let list = format!("{},{}", addrs[0], addrs[1]);
    let start = |i: usize| {
        let name = format!("coordinator-{i}");
        Coordinator::start_on(&env, &name, &env.state_dir.join(&name), addrs[i], &args)
    };
    let mut coordinators = [Some(start(0)?), None];
    // The first leads (it found the lead free): its CA is the pool's.
    let ca = coordinators[0]
        .as_ref()
        .map(|c| c.ca_pem.clone())
        .unwrap_or_default();
    coordinators[1] = Some(start(1)?);
    let urls = format!("https://{},https://{}", addrs[0], addrs[1]);
    let mut agent = Agent::spawn_to(&env, &urls, &ca, true, "agent-0")?;
    agent.wait_ready().await?;
    let mut leader = 0;
    let mut samples = vec![];
    for round in 0..sizes.failover_runs {
        let ch = berth_cli::channel(&list, &ca)
            .await
            .map_err(|e| BenchError::step("finding the leader", e))?;
        Clients::new(ch, &env.token)
            .wait_ready_hosts(1, Duration::from_millis(20), READY_TIMEOUT)
            .await?;
        let pid = coordinators[leader].as_ref().map_or(0, |c| c.pid);
        let killed = Instant::now();
        kill(Pid::from_raw(pid), Signal::SIGKILL)
            .map_err(|e| BenchError::step("kill -9 the leader", e))?;
        let ch = berth_cli::channel(&list, &ca)
            .await
            .map_err(|e| BenchError::step("finding the new leader", e))?;
        let mut clients = Clients::new(ch, &env.token);
        let lease = clients
            .acquire(&format!("failover-{round}"), FAILOVER_WAIT)
            .await?;
        samples.push(ms(killed.elapsed()));
        clients.release(&lease.lease_id).await?;
        // The killed one comes back as the standby.
        coordinators[leader] = None;
        coordinators[leader] = Some(start(leader)?);
        leader = 1 - leader;
    }
    drop(agent);
    drop(coordinators);
    drop(pg);
    drop(env);
    Ok(Figure::new(
        "failover",
        "leader killed (kill -9) -> first Acquire served by the new leader",
        "ms",
    )
    .samples(samples)
    .note(format!(
        "two coordinators on one PostgreSQL, --leader-ttl {FAILOVER_TTL}; one real agent and the client given both addresses; each round kills the current leader and starts it again as the standby"
    )))
}

pub async fn run(sizes: &Sizes) -> Result<Vec<Figure>> {
    let mut figures = vec![p1(sizes).await?];
    let n = sizes.p2_agents.first().copied().unwrap_or(1);
    eprintln!("berth-bench: P2 with {n} agents, embedded store, then PostgreSQL");
    let disk = scale::measure(sizes, n, sizes.p2_agents_per_conn, "qd", Store::Disk).await?;
    let on_pg = scale::measure(sizes, n, sizes.p2_agents_per_conn, "qp", Store::Postgres).await?;
    figures.extend(p2_figures(sizes, &on_pg, &disk));
    figures.push(failover(sizes).await?);
    Ok(figures)
}
