//! P3: a fresh agent from process start to `READY` (network namespace
//! created, dockerd started and answering, `info` self-check passed) and to
//! Ready at the coordinator (registered). Baseline, interleaved run by run:
//! dockerd alone, started with the agent's own command line
//! (`DockerdSpec`), from spawn to its first `/_ping` answer, polled every
//! 2 ms; its namespace is made before the clock starts.
//!
//! Also the agent's idle footprint: RSS and CPU of the `berth-agent`
//! process (not its dockerd) while Ready and idle.

use std::path::Path;
use std::time::{Duration, Instant};

use berth_agent::Provider;
use berth_agent::docker::dockerd::{DockerdSpec, HostPaths};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::procs::{Agent, Clients, Coordinator, Env, RssParts, cpu_time, rss_kib, status_kib};
use super::{BenchError, Figure, Result, Sizes, ms};

/// How often the baseline asks dockerd `/_ping`.
const PING_POLL: Duration = Duration::from_millis(2);
/// How often the coordinator is asked whether the host is Ready.
const REGISTER_POLL: Duration = Duration::from_millis(10);
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// The idle RSS target (issue 19; 15 MiB before).
const IDLE_RSS_TARGET_MIB: f64 = 10.0;
/// "No measurable idle CPU": below this share of one core.
const IDLE_CPU_TARGET_PCT: f64 = 0.1;

pub async fn run(sizes: &Sizes) -> Result<Vec<Figure>> {
    let env = Env::new(&format!("{}3-", sizes.prefix.trim_end_matches('-')))?;
    let coordinator = Coordinator::start(&env, "coordinator", &[])?;
    let mut clients = coordinator.clients().await?;
    let mut to_ready = vec![];
    let mut to_registered = vec![];
    let mut dockerd_alone = vec![];
    for i in 0..sizes.p3_runs {
        let (r, g) = agent_boot(&env, &coordinator, &mut clients, i).await?;
        to_ready.push(ms(r));
        to_registered.push(ms(g));
        dockerd_alone.push(ms(dockerd_boot(&env).await?));
    }
    drop(coordinator);
    drop(env);
    let p3 = Figure::new(
        "P3",
        "agent start to READY (netns, dockerd up, info self-check)",
        "ms",
    )
    .samples(to_ready)
    .baseline(
        "dockerd alone, same flags, start to /_ping",
        dockerd_alone.clone(),
    );
    let ratio = p3.ratio();
    let p3 = p3.check("<= 1.2x dockerd alone", ratio.is_some_and(|r| r <= 1.2));
    let reg = Figure::new(
        "P3 registered",
        "agent start to Ready at the coordinator (polled every 10 ms)",
        "ms",
    )
    .samples(to_registered)
    .baseline("dockerd alone, same flags, start to /_ping", dockerd_alone);
    Ok(vec![p3, reg])
}

/// One agent boot: (spawn -> READY, spawn -> Ready at the coordinator).
async fn agent_boot(
    env: &Env,
    coordinator: &Coordinator,
    clients: &mut Clients,
    i: usize,
) -> Result<(Duration, Duration)> {
    let mut agent = Agent::spawn(env, coordinator, false, &format!("agent-boot-{i}"))?;
    let mut poll = clients.clone();
    let registered = async move {
        let deadline = tokio::time::Instant::now() + BOOT_TIMEOUT;
        loop {
            if !poll.ready_hosts().await?.is_empty() {
                return Ok(Instant::now());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(BenchError::Timeout {
                    what: "the booting agent to be Ready at the coordinator".into(),
                    timeout: BOOT_TIMEOUT,
                });
            }
            tokio::time::sleep(REGISTER_POLL).await;
        }
    };
    let (ready, registered) = tokio::join!(agent.wait_ready(), registered);
    let ready = ready?;
    let registered = registered?.duration_since(agent.spawned);
    agent.stop();
    // The host disconnects as Terminating and is forgotten; wait for that so
    // the next boot is alone in the pool.
    let deadline = tokio::time::Instant::now() + BOOT_TIMEOUT;
    while !clients.hosts().await?.is_empty() {
        if tokio::time::Instant::now() > deadline {
            return Err(BenchError::Timeout {
                what: "the stopped agent's host to leave the pool".into(),
                timeout: BOOT_TIMEOUT,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((ready, registered))
}

/// The agent's [`berth_agent::Local`] provider for this env: the same
/// namespace and directory layout an agent makes.
pub fn local_provider(env: &Env) -> berth_agent::Local {
    let config = berth_agent::Config {
        state_dir: env.hosts_dir(),
        run_dir: env.run_dir.clone(),
        prefix: env.prefix.clone(),
        ..berth_agent::Config::default()
    };
    berth_agent::Local::new(&config)
}

/// A dockerd started the way the agent starts it, in a namespace of its own.
pub struct BareHost {
    pub provider: berth_agent::Local,
    pub spec: DockerdSpec,
    pub child: tokio::process::Child,
}

impl BareHost {
    /// Creates the namespace (not timed by callers), then spawns dockerd.
    pub async fn start(env: &Env) -> Result<(Self, Instant)> {
        let provider = local_provider(env);
        let id = provider
            .identity()
            .await
            .map_err(|e| BenchError::step("creating a host namespace", e))?;
        let spec = DockerdSpec {
            program: "dockerd".into(),
            paths: HostPaths::new(&env.hosts_dir(), &env.run_dir, &id.host_id),
            netns: id.netns.clone(),
            cgroup_parent: berth_agent::provider::cleanup::cgroup_name(&id.host_id),
            network: id.network,
            dns: id.dns(),
            registries: Default::default(),
        };
        let t = Instant::now();
        let child = spec
            .spawn()
            .await
            .map_err(|e| BenchError::step("starting dockerd", e))?;
        Ok((
            BareHost {
                provider,
                spec,
                child,
            },
            t,
        ))
    }

    pub fn socket(&self) -> &Path {
        &self.spec.paths.socket
    }

    /// Stops dockerd and removes the namespace and directories.
    pub async fn destroy(mut self) -> Result<()> {
        let r = self.provider.terminate().await;
        let _ = self.child.kill().await;
        r.map_err(|e| BenchError::step("destroying a host", e))
    }
}

/// One `/_ping` over the unix socket; true on 200 OK.
pub async fn ping(socket: &Path) -> bool {
    let Ok(mut s) = tokio::net::UnixStream::connect(socket).await else {
        return false;
    };
    if s.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 16];
    let mut got = 0;
    while got < 12 {
        match s.read(&mut buf[got..]).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => got += n,
        }
    }
    buf[9..12] == *b"200"
}

/// dockerd alone: spawn -> first `/_ping` answer.
async fn dockerd_boot(env: &Env) -> Result<Duration> {
    let (mut host, t) = BareHost::start(env).await?;
    let deadline = t + BOOT_TIMEOUT;
    let result = loop {
        if ping(host.socket()).await {
            break Ok(t.elapsed());
        }
        if let Ok(Some(status)) = host.child.try_wait() {
            break Err(BenchError::step(
                "dockerd alone",
                format!(
                    "exited with {status}: {}",
                    berth_agent::docker::dockerd::log_tail(&host.spec.paths.log)
                ),
            ));
        }
        if Instant::now() > deadline {
            break Err(BenchError::Timeout {
                what: "dockerd alone to answer /_ping".into(),
                timeout: BOOT_TIMEOUT,
            });
        }
        tokio::time::sleep(PING_POLL).await;
    };
    host.destroy().await?;
    result
}

/// The agent's idle footprint.
pub async fn idle(sizes: &Sizes) -> Result<Vec<Figure>> {
    let env = Env::new(&format!("{}i-", sizes.prefix.trim_end_matches('-')))?;
    let coordinator = Coordinator::start(&env, "coordinator", &[])?;
    let mut clients = coordinator.clients().await?;
    let mut agent = Agent::spawn(&env, &coordinator, false, "agent-idle")?;
    agent.wait_ready().await?;
    clients
        .wait_ready_hosts(1, Duration::from_millis(20), BOOT_TIMEOUT)
        .await?;
    // Past the boot's allocations and the first heartbeats.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = agent.pid;
    let secs = sizes.idle_window.as_secs().max(1);
    let mut rss = vec![];
    let mut cpu = vec![];
    let start_cpu = cpu_time(pid).unwrap_or_default();
    let start = Instant::now();
    let mut last = start_cpu;
    for _ in 0..secs {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = cpu_time(pid).unwrap_or_default();
        cpu.push(100.0 * now.saturating_sub(last).as_secs_f64());
        last = now;
        rss.push(rss_kib(pid).unwrap_or(0.0) / 1024.0);
    }
    let window = start.elapsed();
    // What the RSS is made of at the end of the window: anonymous pages
    // (heap, stacks, relocated data) against file-backed ones (the code and
    // read-only data of the binary and its libraries that were mapped since
    // boot: clean pages shared with the page cache).
    let anon = status_kib(pid, "RssAnon").unwrap_or(0.0) / 1024.0;
    let file = status_kib(pid, "RssFile").unwrap_or(0.0) / 1024.0;
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, Iterator::count);
    let parts = RssParts::of(pid).unwrap_or_default();
    let total = last.saturating_sub(start_cpu);
    let avg = 100.0 * total.as_secs_f64() / window.as_secs_f64();
    drop(agent);
    drop(coordinator);
    drop(env);
    let max_rss = rss.iter().copied().fold(0.0, f64::max);
    let rss_fig = Figure::new(
        "idle RSS",
        "berth-agent RSS while Ready and idle (sampled every second)",
        "MiB",
    )
    .samples(rss)
    .check(
        format!("<= {IDLE_RSS_TARGET_MIB} MiB"),
        max_rss <= IDLE_RSS_TARGET_MIB,
    )
    .note(format!(
        "last sample: {anon:.2} MiB anonymous (heap, stacks), {file:.2} MiB file-backed \
         (code and read-only data of the binary and its libraries); {threads} threads"
    ))
    .note(format!(
        "smaps, MiB: berth-agent code {:.2} resident of {:.2} mapped; its other mappings {:.2} \
         ({:.2} anonymous: relocated and written data); shared libraries {:.2}; [heap] {:.2}; \
         other anonymous (thread stacks, other malloc arenas, large allocations) {:.2}",
        parts.exe_code / 1024.0,
        parts.exe_code_mapped / 1024.0,
        parts.exe_data / 1024.0,
        parts.exe_data_anon / 1024.0,
        parts.libraries / 1024.0,
        parts.heap / 1024.0,
        parts.other_anon / 1024.0,
    ));
    let cpu_fig = Figure::new("idle CPU", "berth-agent CPU while Ready and idle, per second", "% core")
        .samples(cpu)
        .check(
            format!("average <= {IDLE_CPU_TARGET_PCT}% of a core"),
            avg <= IDLE_CPU_TARGET_PCT,
        )
        .note(format!(
            "{:.0} ms of CPU over {:.1} s = {avg:.3}% of one core (heartbeat every 2 s; clock tick 10 ms)",
            ms(total),
            window.as_secs_f64()
        ));
    Ok(vec![rss_fig, cpu_fig])
}
